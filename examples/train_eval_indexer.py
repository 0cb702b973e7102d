"""Train the memory indexer of the paper-layout backbone with the project's own pipeline, choose its settings on a
validation split, and gate it on a test split, per task.

    python examples/train_eval_indexer.py --backbone runs/paper-bf16 --workdir runs/paper-indexer --stage dump
    python examples/train_eval_indexer.py --backbone runs/paper-bf16 --workdir runs/paper-indexer --stage train --tau 16
    python examples/train_eval_indexer.py --backbone runs/paper-bf16 --workdir runs/paper-indexer --stage train --tau 64

dump: question documents (a question every ~320 tokens, answered in place; fm_transformers.eval.indexer_data) for
three splits, labelled by the frozen backbone every --dump-tau tokens in blocks (dump_blocks.py). With
--max-minutes it stops between blocks and exits with status 75: the same command goes on.
train: for --tau, the triggers that carry meaning (each question's end, every tau steps of each answer) and their
labels, widened from the dump's tau, in each candidate label set (label_selection.py); one indexer per candidate
label set, learning rate and start (--starts: fresh weights, or each target layer's native indexer query tower,
which departs from the paper) on the three target layers, trained with fm_transformers.training; the one validation
prefers (gate.choose_candidate: among those whose resident set at threshold 0.5 holds at most 15% of the chunks,
the best gate score; if none does, the best ranking at the budget) is kept in WORKDIR/tau<TAU>/indexer and gated on
the test split (gate.py), beside what each candidate label set reaches as the scores (the ceiling of an indexer
trained on it; it chooses nothing). Written: WORKDIR/tau<TAU>/gate.json. With --max-minutes it starts no
candidate once the last one's time would not fit and exits with status 75: the same command goes on (selected
labels and trained candidates are kept).

Labels follow the paper's recipe (nucleus 0.6 of the native top-k, lookahead union over tau) with the vote scaled
to the backbone's CSA layers (3 of 21 -> 1 of 7) unless --votes lists candidates: with the paper-layout backbone
1 of 7 marks most of the context (docs/evaluation.md, sixth run), so the vote is worth choosing; the dump stores
every chunk's votes, so one dump serves every vote. --evidence-labels adds one more candidate label set, departing
from the paper: each trigger's question evidence (label_selection.EVIDENCE); --window-evidence-labels another, the
evidence of each trigger's next tau answer tokens only (EVIDENCE_WINDOW). Every split is seeded apart from the
others and from the comparison's examples.
"""

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from fm_transformers.eval.dump_blocks import block_directories, dump_in_blocks, is_complete
from fm_transformers.eval.gate import CHOICE_RULE, choose_candidate, gate_metrics, selection_score
from fm_transformers.eval.indexer_data import question_documents, question_trigger_warmup, scaled_vote
from fm_transformers.eval.label_selection import EVIDENCE, EVIDENCE_SETS, EVIDENCE_WINDOW, LabelSet, select_label_sets
from fm_transformers.indexer import MemoryIndexerModel, default_target_layers
from fm_transformers.layout import csa_layers
from fm_transformers.training import DumpConfig, LabelConfig, TrainConfig, train
from fm_transformers.training.shards import read_manifest

STOPPED_EARLY = 75
SPLITS = ("train", "validation", "test")


STARTS = ("random", "native")


def candidate_starts(text: str) -> list[str]:
    """--starts: a comma-separated list of STARTS."""
    starts = [name for name in text.split(",") if name]
    if not starts or any(name not in STARTS for name in starts):
        raise argparse.ArgumentTypeError(f"{text!r}: choose among {', '.join(STARTS)}, comma-separated")
    return starts


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", required=True, help="the trained paper-layout backbone (save_pretrained dir)")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--stage", choices=["dump", "train"], required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--length", type=int, default=2048, help="tokens of a document before its last answer")
    parser.add_argument("--spacing", type=int, default=320, help="tokens between questions, on average")
    parser.add_argument(
        "--align", type=int, default=64, help="question ends are aligned to this (every tau divides it)"
    )
    parser.add_argument("--train-docs", type=int, default=5000)
    parser.add_argument("--validation-docs", type=int, default=300)
    parser.add_argument("--test-docs", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0, help="seeds the documents of every split")
    parser.add_argument("--dump-tau", type=int, default=16, help="the dump's tau; every trained tau is a multiple")
    parser.add_argument(
        "--votes", default=None,
        help="train: candidate votes, CSA layers that must keep a chunk, chosen on validation "
        "(default: 3 of 21 scaled)",
    )
    parser.add_argument(
        "--evidence-labels", action="store_true",
        help="train: one more candidate, labels marking each trigger's question evidence (departs from the paper)",
    )
    parser.add_argument(
        "--window-evidence-labels", action="store_true",
        help="train: one more candidate, labels marking the evidence of each trigger's next tau answer tokens "
        "(departs from the paper)",
    )
    parser.add_argument("--block-size", type=int, default=250, help="documents per dump block")
    parser.add_argument(
        "--dump-batch-size",
        type=int,
        default=1,
        help="documents per forward of the dump: one is bound by kernel launches on a GPU (the recipe: 32)",
    )
    parser.add_argument(
        "--max-minutes", type=float, default=None,
        help="dump: start no block after this; train: start no candidate whose predecessor's time would not fit",
    )
    parser.add_argument("--tau", type=int, default=16, help="train: decode steps between recalls")
    parser.add_argument("--lrs", default="1e-3,3e-3", help="train: candidate learning rates (chosen on validation)")
    parser.add_argument(
        "--starts", default="random", type=candidate_starts,
        help="train: candidate starting weights, comma-separated: random, native (each target layer's native "
             "indexer query tower, MemoryIndexerModel.from_native; its rank is the backbone's q_lora_rank)",
    )
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-heads", type=int, default=16)
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--budget", type=float, default=0.1, help="gate: the comparison's resident budget")
    parser.add_argument("--recency-chunks", type=int, default=16, help="gate: newest chunks always resident")
    parser.add_argument("--sink-chunks", type=int, default=1, help="gate: first chunks always resident")
    args = parser.parse_args()
    if args.votes is not None:
        try:
            args.votes = [int(vote) for vote in args.votes.split(",")]
        except ValueError:
            parser.error(f"--votes must be CSA layer counts separated by commas, got {args.votes!r}")
        if min(args.votes) < 1:
            parser.error(f"--votes must be at least 1 CSA layer each, got {args.votes}")
    return args


def split_documents(args, split: str):
    count = {"train": args.train_docs, "validation": args.validation_docs, "test": args.test_docs}[split]
    return question_documents(count, args.length, split, args.seed, args.spacing, args.align)


def dump(args, workdir: Path) -> bool:
    dtype = torch.float32 if args.device == "cpu" else "auto"  # 2-core CPU: 2-4 s a document in fp32, 54 s in bf16
    backbone = AutoModelForCausalLM.from_pretrained(args.backbone, dtype=dtype).to(args.device).eval()
    vote = scaled_vote(len(csa_layers(backbone.config)))  # the dump's own labels; its votes serve any other
    labels = LabelConfig(tau=args.dump_tau, warmup=question_trigger_warmup(args.length, args.dump_tau), vote=vote)
    config = DumpConfig(
        target_layers=tuple(default_target_layers(backbone.config)), labels=labels, chunk_size=1024,
        batch_size=args.dump_batch_size,
    )
    for split in SPLITS:
        documents = [document for document, _ in split_documents(args, split)]
        out = workdir / "raw" / split
        if not dump_in_blocks(backbone, documents, out, config, args.backbone, args.block_size, args.max_minutes):
            return False
    return True


def candidate_label_sets(args) -> list[LabelSet]:
    """The label sets to choose among: the votes, each checked against the backbone's CSA layers before any work,
    and the evidence label sets asked for."""
    layers = len(csa_layers(AutoConfig.from_pretrained(args.backbone)))
    votes = args.votes or [scaled_vote(layers)]
    if max(votes) > layers:
        raise SystemExit(f"error: --votes {max(votes)} asks more CSA layers than the backbone's {layers}")
    evidence = ((EVIDENCE, args.evidence_labels), (EVIDENCE_WINDOW, args.window_evidence_labels))
    return [*votes, *(label_set for label_set, asked in evidence if asked)]


def label_set_name(label_set: LabelSet) -> str:
    """The directory and candidate prefix of a label set: vote<v>, evidence or evidence-window."""
    return label_set if label_set in EVIDENCE_SETS else f"vote{label_set}"


def select_tau(args, workdir: Path, out: Path, label_sets: list[LabelSet]) -> None:
    """Each split's labels for --tau in every candidate label set, in one pass over the dump; a split whose label
    sets are all complete (a run that stopped at its time limit) is kept."""
    for split in SPLITS:
        documents = split_documents(args, split)
        targets = {label_set: out / label_set_name(label_set) / split for label_set in label_sets}
        if all(is_complete(target) for target in targets.values()):
            continue
        blocks = block_directories(workdir / "raw" / split, len(documents), args.block_size)
        if not all(is_complete(block) for block in blocks):
            raise SystemExit(f"error: the {split} dump in {workdir / 'raw'} is not complete: run --stage dump first")
        questions = {document.doc_id: asked for document, asked in documents}
        try:
            select_label_sets(blocks, targets, questions, args.tau)
        except ValueError as error:
            raise SystemExit(f"error: {error}") from None


def train_tau(args, workdir: Path) -> dict | None:
    """The gate report, or None when --max-minutes stopped it before every candidate was trained."""
    start, last = time.monotonic(), 0.0
    out = workdir / f"tau{args.tau}"
    wanted = candidate_label_sets(args)
    select_tau(args, workdir, out, wanted)
    label_sets = [label_set_name(label_set) for label_set in wanted]
    gate = dict(budget=args.budget, recency_chunks=args.recency_chunks, sink_chunks=args.sink_chunks)
    lrs = [float(x) for x in args.lrs.split(",")]
    starts = {"random": None, "native": out / "native-start"}
    candidates = {
        f"{labels}-lr{lr:g}" + ("" if begin == "random" else f"-{begin}"): (labels, lr, starts[begin])
        for labels in label_sets for lr in lrs for begin in args.starts
    }
    if "native" in args.starts and not (starts["native"] / "config.json").is_file():
        save_native_start(args, out / label_sets[0] / "train", starts["native"])
    validation = {}
    for name, (labels, lr, start_from) in candidates.items():
        trained = is_trained(out / name)
        if not trained and args.max_minutes is not None and time.monotonic() - start + last > 60 * args.max_minutes:
            return None
        began = time.monotonic()
        indexer = train_candidate(args, out / labels, out / name, lr, start_from)
        validation[name] = gate_metrics(indexer, out / labels / "validation", **gate)
        if not trained:
            last = time.monotonic() - began
    chosen, meets = choose_candidate(validation)
    chosen_labels, lr, start_from = candidates[chosen]
    shutil.rmtree(out / "indexer", ignore_errors=True)
    shutil.copytree(out / chosen, out / "indexer", ignore=shutil.ignore_patterns("checkpoints"))
    indexer = MemoryIndexerModel.from_pretrained(out / "indexer").to(args.device)
    test = gate_metrics(indexer, out / chosen_labels / "test", **gate)
    ceilings = {labels: gate_metrics(None, out / labels / "test", **gate) for labels in label_sets}  # chooses nothing
    report = {
        "tau": args.tau, "chosen": chosen, "chosen_labels": chosen_labels, "chosen_lr": f"{lr:g}",
        "chosen_start": "random" if start_from is None else "native",
        "chosen_on": "validation", "criterion": CHOICE_RULE,
        "meets_resident_target": meets, "selection_score": selection_score(validation[chosen]),
        "gate_settings": gate, "validation": validation, "test": test, "labels_on_test": ceilings,
        "documents": {s: getattr(args, f"{s}_docs") for s in SPLITS},
    }
    (out / "gate.json").write_text(json.dumps(report, indent=2))
    return report


def is_trained(run_dir: Path) -> bool:
    return (run_dir / "training_summary.json").is_file()


def save_native_start(args, labels: Path, directory: Path) -> None:
    """The native candidates' starting weights: the backbone's native indexer query towers on the target layers
    of the labels in `labels` (those the candidates train on), with --num-heads heads (the native ones first)."""
    backbone = AutoModelForCausalLM.from_pretrained(args.backbone, dtype=torch.float32)
    heads = max(args.num_heads, backbone.config.index_n_heads)
    layers = read_manifest(labels)["target_layers"]
    start = MemoryIndexerModel.from_native(backbone, layers=layers, num_heads=heads)
    start.save_pretrained(directory)


def train_candidate(args, data: Path, run_dir: Path, lr: float, start_from: Path | None) -> MemoryIndexerModel:
    """One candidate indexer on the labels in `data` (train, validation), trained unless already done; from
    fresh weights, or from the indexer in `start_from`."""
    if not is_trained(run_dir):
        train(TrainConfig(
            data=str(data / "train"), eval_data=str(data / "validation"), output_dir=str(run_dir),
            init_from=None if start_from is None else str(start_from),
            num_heads=args.num_heads, rank=args.rank, max_steps=args.steps, batch_size=args.batch_size,
            learning_rate=lr, warmup_steps=min(100, args.steps // 10), cpu=args.device == "cpu",
            bf16=args.device == "cuda", save_every=500, resume=(run_dir / "checkpoints").is_dir(),
        ))
    return MemoryIndexerModel.from_pretrained(run_dir).to(args.device)


def print_gate(report: dict) -> None:
    """The choice, the test split per task, and what each candidate label set would reach as the scores (the
    ceiling of an indexer trained on it)."""
    meets = "" if report["meets_resident_target"] else " (none met the resident target: the best at the budget)"
    start = report.get("chosen_start", "random")
    print(f"\ntau {report['tau']}: {report['chosen_labels']}, lr {report['chosen_lr']}, {start} start, chosen on "
          f"validation{meets}")
    print("validation, all tasks:")
    for name, metrics in report["validation"].items():
        m = metrics["all"]
        print(f"  {name:<16} score {selection_score(metrics):.3f}  resident paper {m['paper_resident_fraction']:.3f}")
    print("test split, per task:")
    print(
        f"{'task':<12}{'questions':>10}{'evid. paper':>12}{'evid. budget':>13}{'window paper':>13}{'window budget':>14}"
        f"{'used paper':>11}{'used budget':>12}{'resident paper':>15}"
    )
    for task in sorted(report["test"], key=lambda name: (name == "all", name)):
        m = report["test"][task]
        print(
            f"{task:<12}{m['question_triggers']:>10}{m['paper_evidence_recall']:>12.3f}"
            f"{m['budget_evidence_recall']:>13.3f}{m['paper_window_evidence_recall']:>13.3f}"
            f"{m['budget_window_evidence_recall']:>14.3f}"
            f"{m['paper_used_recall']:>11.3f}{m['budget_used_recall']:>12.3f}{m['paper_resident_fraction']:>15.3f}"
        )
    print("the labels as the scores (a perfect learner of them), test split, all tasks, paper resident set:")
    for name, metrics in report["labels_on_test"].items():
        m = metrics["all"]
        print(
            f"  {name:<15} evidence {m['paper_evidence_recall']:.3f}  window evidence "
            f"{m['paper_window_evidence_recall']:.3f}  used {m['paper_used_recall']:.3f}"
            f"  resident {m['paper_resident_fraction']:.3f}"
        )


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args()
    workdir = Path(args.workdir)
    if args.stage == "dump":
        if not dump(args, workdir):
            print("stopped by --max-minutes between dump blocks: run again to go on")
            raise SystemExit(STOPPED_EARLY)
        return
    if args.tau % args.dump_tau or args.align % args.tau:
        raise SystemExit(
            f"error: --tau {args.tau} must be a multiple of --dump-tau {args.dump_tau} and divide --align {args.align}"
        )
    report = train_tau(args, workdir)
    if report is None:
        print("stopped by --max-minutes between candidates: run again to go on")
        raise SystemExit(STOPPED_EARLY)
    print_gate(report)


if __name__ == "__main__":
    main()
