"""The comparison of issue 16: full cache, LSA as the paper runs it, recency and random at LSA's bytes, LSA under a
fixed budget, the oracle lookahead, and native-indexer paging, on the same backbone and examples, with paired
bootstrap 95% intervals against full (rows: fm_transformers.eval.methods).

Choose the open settings on a validation draw (never reported), then evaluate on other draws:
    python examples/compare_methods.py --backbone runs/paper-bf16 --indexer runs/paper-indexer/tau64/indexer \\
        --tau 64 --tune --seed 0 --lengths 2048 --examples 40 --out tuned64.json
    python examples/compare_methods.py --backbone runs/paper-bf16 --indexer runs/paper-indexer/tau64/indexer \\
        --tau 64 --settings tuned64.json --seed 1 --lengths 2048 --examples 200 --out tau64-2048.json
A comparison can run in parts (--lengths, --tasks, --first/--examples select examples) and be joined:
    python examples/compare_methods.py --merge tau64-*.json --out tau64.json --plot tau64.png
--smoke runs everything on an untrained paper-layout backbone of smoke size and a fresh indexer: that checks the
machinery, not accuracy.

Every generation writes exactly as many tokens as the answer (EOS cannot end it early); on CUDA, LSA rows
without refresh layers decode through a CUDA graph (--eager: not), as generate(cache_implementation="lsa") does.
Memory per row: CSA bytes on the device at the end, the allocator's peaks during prefill and during decode (CUDA;
None elsewhere); and per generation: level-1 triggers, chunks fetched from the host pool, host syncs per token
(CUDA), and for the paging rows their refreshes and whole-history scoring. Prints the table and writes JSON
(records per example, summary, settings and how they were chosen) and a plot. --paging-only runs the native-paging
rows alone, a part that --merge joins with the others (the recipe's `paging` stage).
"""

import argparse
import json
from dataclasses import asdict

import torch
from transformers import AutoModelForCausalLM

import fm_transformers as fm
from fm_transformers.eval import build_eval_backbone, eval_backbone_config
from fm_transformers.eval.catalog import TASK_SETS, evaluation_examples
from fm_transformers.eval.comparison import run_comparison
from fm_transformers.eval.methods import PAGING_ROWS, RowSettings, paper_rows
from fm_transformers.eval.paper_layout import check_paper_layout
from fm_transformers.eval.summary import format_lead, format_table, format_tasks, join_records, summarize
from fm_transformers.eval.tuning import tune

# Fields of a run that must agree for parts to be joined.
RUN_FIELDS = ("backbone", "indexer", "tau", "seed", "answer_tokens", "settings", "tuning", "dtype")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", help="the paper-layout backbone (a save_pretrained dir)")
    parser.add_argument("--indexer", help="its memory indexer, trained for --tau")
    parser.add_argument("--smoke", action="store_true", help="untrained smoke-size backbone and a fresh indexer")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="join parts of one comparison, run nothing")
    parser.add_argument("--tune", action="store_true", help="choose the open settings on this draw (--seed)")
    parser.add_argument("--settings", help="settings chosen by a --tune run (its --out)")
    parser.add_argument("--tasks", default="long", help="a task set (long, ruler) or comma-separated tasks")
    parser.add_argument("--lengths", default="2048,4096,8192")
    parser.add_argument("--examples", type=int, default=200, help="examples per task and length")
    parser.add_argument("--first", type=int, default=0, help="index of the first example (a part of a draw)")
    parser.add_argument("--seed", type=int, default=1, help="the draw of examples; the tuning draw must differ")
    parser.add_argument("--answer-tokens", type=int, default=None, help="answer length of the long tasks (default 130)")
    parser.add_argument("--tau", type=int, default=64)
    parser.add_argument("--threshold", type=float, default=0.5, help="LSA's threshold (the paper's)")
    parser.add_argument("--budget", type=float, default=0.1, help="resident budget of the budgeted rows")
    parser.add_argument("--recency-chunks", type=int, default=16, help="without --settings: the recency tail")
    parser.add_argument("--sink-chunks", type=int, default=1)
    parser.add_argument("--budget-threshold", type=float, default=0.0, help="without --settings: lsa (budget)'s")
    parser.add_argument("--budget-recency-chunks", type=int, default=None,
                        help="without --settings: the budgeted rows' tail (default: --recency-chunks)")
    parser.add_argument("--tails", default="4,16,32", help="--tune: candidate recency tails")
    parser.add_argument("--thresholds", default="0,0.3,0.5", help="--tune: candidate budget thresholds")
    parser.add_argument(
        "--paging-layers", default="", help="refresh layers of the paging rows (default: target layers)"
    )
    rows = parser.add_mutually_exclusive_group()
    rows.add_argument("--no-paging", action="store_true", help="leave the native-paging rows out")
    rows.add_argument("--paging-only", action="store_true",
                      help="the native-paging rows alone (joined later with a part that ran the others)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eager", action="store_true", help="decode LSA eagerly on CUDA too (default: a CUDA graph)")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="auto: as saved")
    parser.add_argument("--out", default="compare.json")
    parser.add_argument("--plot", default=None, help="a PNG of accuracy against length, intervals against full")
    return parser.parse_args()


def load(args):
    if args.smoke:
        model = build_eval_backbone(eval_backbone_config("paper-smoke"), seed=0)
        indexer = fm.MemoryIndexerModel.from_backbone(model, num_heads=2, rank=8)
    else:
        if not (args.backbone and args.indexer):
            raise SystemExit("error: pass --backbone and --indexer, --smoke, or --merge")
        dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
        model = AutoModelForCausalLM.from_pretrained(args.backbone, dtype=dtype)
        indexer = args.indexer
    model = model.to(args.device).eval()
    fm.enable_bounded_prefill(model)  # full prefills as LSA does: the rows differ in decode only
    return model, fm.attach_memory_indexer(model, indexer)


def settings_from(args) -> tuple[RowSettings, dict | None]:
    paging = tuple(int(layer) for layer in args.paging_layers.split(",") if layer) or None
    base = RowSettings(
        tau=args.tau, threshold=args.threshold, recency_chunks=args.recency_chunks, sink_chunks=args.sink_chunks,
        budget=args.budget, budget_threshold=args.budget_threshold,
        budget_recency_chunks=args.budget_recency_chunks, paging_layers=paging, seed=args.seed,
    )
    if not args.settings:
        return base, None
    with open(args.settings) as handle:
        tuned = json.load(handle)
    if tuned["seed"] == args.seed:
        raise SystemExit(f"error: seed {args.seed} chose the settings in {args.settings}: evaluate on another draw")
    if tuned["tau"] != args.tau:
        raise SystemExit(f"error: {args.settings} was tuned at tau {tuned['tau']}, this run is at tau {args.tau}")
    chosen = {name: tuned["settings"][name] for name in tuned["tuning"]["chosen"]}
    return RowSettings(**{**asdict(base), **chosen}), {"seed": tuned["seed"], **tuned["tuning"]}


def examples_for(args, length: int) -> list:
    tasks = TASK_SETS.get(args.tasks) or tuple(args.tasks.split(","))
    found = []
    for task in tasks:
        drawn = evaluation_examples(task, length, args.first + args.examples, args.seed, args.answer_tokens)
        found += [(args.first + offset, example) for offset, example in enumerate(drawn[args.first :])]
    return found


def run(args) -> dict:
    model, indexer = load(args)
    lengths = [int(length) for length in args.lengths.split(",")]
    layout = check_paper_layout(model.config, lengths, args.budget)
    settings, tuning = settings_from(args)
    graph = False if args.eager else None
    head = {
        "kind": "tuning" if args.tune else "comparison", "backbone": args.backbone or "smoke",
        "indexer": args.indexer or "fresh",
        "tau": args.tau, "seed": args.seed, "answer_tokens": args.answer_tokens, "dtype": str(model.dtype),
        "device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else args.device,
        "layout": layout,
    }
    if args.tune:
        examples = [example for length in lengths for _, example in examples_for(args, length)]
        tails = [int(value) for value in args.tails.split(",")]
        thresholds = [float(value) for value in args.thresholds.split(",")]
        chosen, report = tune(model, indexer, examples, settings, tails, thresholds, args.batch_size, graph=graph)
        return {**head, "settings": asdict(chosen), "tuning": report}
    rows = paper_rows(indexer, settings, paging=not args.no_paging)
    if args.paging_only:
        rows = [row for row in rows if row.name in PAGING_ROWS]
    records = {}
    for length in lengths:
        indexed = examples_for(args, length)
        found = run_comparison(model, [example for _, example in indexed], rows, args.batch_size, graph=graph)
        records[str(length)] = {
            row: [{**record, "index": index} for (index, _), record in zip(indexed, listed)]
            for row, listed in found.items()
        }
    return {**head, "settings": asdict(settings), "tuning": tuning, "records": records}


def merge(paths: list[str]) -> dict:
    runs = []
    for path in paths:
        with open(path) as handle:
            runs.append(json.load(handle))
    for path, other in zip(paths[1:], runs[1:]):
        differing = [name for name in RUN_FIELDS if other.get(name) != runs[0].get(name)]
        if differing:
            raise SystemExit(
                f"error: {path} differs from {paths[0]} in {', '.join(differing)}: not parts of one comparison"
            )
    try:
        records = join_records([run["records"] for run in runs])
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    return {**runs[0], "records": records, "merged_from": paths}


def plot(summary: dict, path: str):
    """Exact match and token accuracy against the context length, a panel each, every row with its interval at the
    lengths it ran (the figure, saved to path)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted(summary, key=int)
    names = list(dict.fromkeys(name for n in lengths for name in summary[n]))  # a row may miss some lengths
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    panels = (
        ("mean_accuracy", "vs_full", "mean exact match (%)"),
        ("mean_token_accuracy", "tokens_vs_full", "mean token accuracy (%)"),
    )
    for axis, (mean, versus, label) in zip(axes, panels):
        for name in names:
            measured = [n for n in lengths if name in summary[n]]
            full = [100 * summary[n]["full"][mean] for n in measured]
            means = [100 * summary[n][name][mean] for n in measured]
            intervals = [summary[n][name][versus] for n in measured]
            below = [0 if i is None else m - (f + 100 * i["low"]) for m, f, i in zip(means, full, intervals)]
            above = [0 if i is None else (f + 100 * i["high"]) - m for m, f, i in zip(means, full, intervals)]
            axis.errorbar([int(n) for n in measured], means, yerr=[below, above], label=name, marker="o", capsize=3)
        axis.set_xscale("log", base=2)
        axis.set_xticks([int(n) for n in lengths], lengths)
        axis.set_xlabel("context length (tokens)")
        axis.set_ylabel(label)
    figure.suptitle("Rows against full (bars: paired bootstrap 95% interval of the difference)")
    axes[1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return figure


def main() -> None:
    args = parse_args()
    result = merge(args.merge) if args.merge else run(args)
    alone = args.paging_only and not args.merge  # rows read against full's, which another part holds
    if result["kind"] == "comparison" and not alone:
        result["summary"] = summarize(result["records"], args.bootstrap, seed=result["seed"])
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=1)
    if result["kind"] == "tuning":
        print(json.dumps(result["tuning"], indent=1))
        return
    if alone:
        print(f"the native-paging rows in {args.out}: --merge it with the parts that ran full for their summary")
        return
    print(format_table(result["summary"]))
    print()
    print(format_tasks(result["summary"]))
    print()
    print(format_lead(result["summary"]))
    if args.plot:
        plot(result["summary"], args.plot)


if __name__ == "__main__":
    main()
