"""Does a backbone keep its answers when only a small resident set of compressed chunks stays on the device? Two
ceilings of any memory indexer, measured before one is trained (docs/evaluation.md, "A CPU preview after the
backbone"):

    python examples/probe_resident_sets.py runs/paper/backbone-bf16 --examples 4 --out probe.json

For each long task, --examples examples of draw --seed (5: neither the tuning draw 0 nor the reported draw 1) at
--length are answered by the stock cache, whose native top-k picks of every CSA layer are recorded, then:
- touched: the distinct chunks those picks cover in each tau window, as a share of the chunks that exist, pooled
  over the CSA layers (one resident set serves them all, as LSA's does) and per layer;
- picks: where those picks land while the answer is written, as shares of all picks (PICK_KINDS, first match);
- the oracle lookahead (the comparison's row, methods.py) at each of --budgets ("none": uncapped, which must
  reproduce the stock answers): the picks of the next tau steps, most picked first;
- the evidence oracle at each recency tail of --tails: only the chunks of the statements the answer is read from
  (long_tasks.evidence_chunks), the tail and the sink, at every recall, uncapped;
- the evidence oracle with --fillers more chunks (first tail): drawn from the filler, or from the other
  statements (distractors), or the ones the stock run picked most (an oracle: each layer's spare picks keep
  returning to a few chunks of its own). The top-k fills all its slots from what is resident: this tells whether
  the answers need more than the evidence or only harmless chunks in the slots the evidence leaves free;
- the window evidence oracle at each tail: at each recall only the statements the next tau answer tokens are read
  from (long_tasks.window_evidence_chunks), the tail and the sink; then with --fillers filler chunks (first tail):
  what labels of a window's evidence (label_selection.EVIDENCE_WINDOW) could reach.
Each answered by greedy decoding of the answer's length; reported: answer tokens right, tokens the same as the
stock run's, exact match, and the resident CSA bytes' mean share over the recalls.
"""

import argparse
import json
import random

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from fm_transformers.cache import OffloadedLookaheadCache
from fm_transformers.config import LSAConfig
from fm_transformers.layout import csa_compress_rate, csa_layers
from fm_transformers.policies import OraclePolicy
from fm_transformers.eval.catalog import evaluation_examples
from fm_transformers.eval.comparison import generate
from fm_transformers.eval.long_tasks import (
    LONG_TASK_NAMES,
    answer_evidence,
    evidence_chunks,
    expected_triggers,
    question_start,
    statement_chunks,
    window_evidence_chunks,
)
from fm_transformers.eval.matched import RecordingPolicy
from fm_transformers.eval.oracle import NativePicks, lookahead_sets
from fm_transformers.eval.tasks import exact_match, tokens_right


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("backbone", help="a paper-layout backbone (a save_pretrained dir)")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--examples", type=int, default=4, help="examples per task, decoded as one batch")
    parser.add_argument("--seed", type=int, default=5, help="the draw (0 tunes the comparison, 1 is reported)")
    parser.add_argument("--answer-tokens", type=int, default=None, help="long tasks' answer length (default 130)")
    parser.add_argument("--tau", type=int, default=64)
    parser.add_argument("--budgets", default="0.1,0.25,0.5,none", help="the oracle lookahead's budgets")
    parser.add_argument("--tails", default="16,48", help="the evidence oracle's recency tails (chunks)")
    parser.add_argument("--fillers", type=int, default=48, help="chunks the evidence oracle's last rows add")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="JSON with every measure")
    args = parser.parse_args(argv)
    try:
        args.budgets = [None if b == "none" else float(b) for b in args.budgets.split(",") if b]
        args.tails = [int(t) for t in args.tails.split(",")]
    except ValueError:
        parser.error("--budgets takes fractions or 'none', --tails whole chunk counts, comma-separated")
    return args


def touched_shares(steps: list[torch.Tensor], tau: int, prompt_length: int, rate: int, layers: int) -> dict:
    """Mean over windows and sequences of the distinct chunks the picks of a tau window cover, over the chunks
    that exist at its recall: pooled over the CSA layers, and per layer."""
    pooled, per_layer = [], []
    for first in range(0, len(steps), tau):
        window = torch.stack(steps[first : first + tau])  # (steps, batch, layers x k)
        chunks = (prompt_length + first) // rate
        for picks in window.unbind(1):
            picks = picks.reshape(len(picks), layers, -1)
            pooled.append(picks[picks >= 0].unique().numel() / chunks)
            per_layer.append(sum(p[p >= 0].unique().numel() for p in picks.unbind(1)) / layers / chunks)
    return {"pooled": sum(pooled) / len(pooled), "per_layer": sum(per_layer) / len(per_layer)}


PICK_KINDS = ("tail", "sink", "evidence", "other statements", "question", "answer", "filler")


def pick_kinds(steps: list[torch.Tensor], examples, rate: int, tail: int) -> dict[str, float]:
    """The share of the stock run's picks (every layer, decode forward and sequence; empty slots left out) by what
    the chunk holds, the first of PICK_KINDS that fits: the `tail` newest chunks made at that forward (LSA keeps
    them), the first chunk, an evidence statement, another statement, the question, the answer written so far,
    filler."""
    counts = dict.fromkeys(PICK_KINDS, 0)
    prompt = len(examples[0].input_ids)
    for index, example in enumerate(examples):
        evidence, statements = set(evidence_chunks(example, rate)), set(statement_chunks(example, rate))
        question, answer = question_start(example) // rate, prompt // rate + 1  # first chunk holding each
        for forward, picks in enumerate(steps, start=1):
            made = (prompt + forward) // rate  # chunks complete once position prompt + forward - 1 is in
            for chunk in picks[index][picks[index] >= 0].tolist():
                kind = (
                    "tail" if chunk >= made - tail else "sink" if chunk < 1 else "evidence" if chunk in evidence
                    else "other statements" if chunk in statements else "answer" if chunk >= answer
                    else "question" if chunk >= question else "filler"
                )
                counts[kind] += 1
    total = max(sum(counts.values()), 1)
    return {kind: count / total for kind, count in counts.items()}


def answer_scores(tokens: torch.Tensor, stock: torch.Tensor, examples) -> dict:
    count, length = len(examples), len(examples[0].answer)
    return {
        "tokens_right": sum(tokens_right(t, e.answer) for t, e in zip(tokens.tolist(), examples)) / (count * length),
        "same_as_stock": sum(tokens_right(t, s) for t, s in zip(tokens.tolist(), stock.tolist())) / (count * length),
        "exact_match": sum(exact_match(t, e.answer) for t, e in zip(tokens.tolist(), examples)) / count,
    }


def decode_with_sets(model, input_ids, length, sets, config: LSAConfig) -> tuple[torch.Tensor, float]:
    """Greedy answers with `sets` resident at each recall, and the resident share of the chunks averaged over the
    recalls and sequences (the end state alone would show only the last recall's, which for the oracle serves a
    window cut short by the answer's end)."""
    policy = RecordingPolicy(OraclePolicy(sets), config)
    cache = OffloadedLookaheadCache(model, config, policy=policy)
    with torch.no_grad():
        tokens, _ = generate(model, input_ids, length, cache)
    shares = [kept / chunks for chunks, counts in policy.recorded.values() for kept in counts]
    return tokens, sum(shares) / len(shares)


def probe_task(model, task: str, args) -> dict:
    examples = evaluation_examples(task, args.length, args.examples, seed=args.seed, answer_tokens=args.answer_tokens)
    input_ids = torch.tensor([e.input_ids for e in examples], device=args.device)
    length, prompt = len(examples[0].answer), input_ids.shape[1]
    rate, layers = csa_compress_rate(model.config), len(csa_layers(model.config))
    with torch.no_grad(), NativePicks(model) as picks:
        stock, _ = generate(model, input_ids, length)
    steps = picks.host_steps()
    result = {
        "stock": answer_scores(stock, stock, examples),
        "touched": touched_shares(steps, args.tau, prompt, rate, layers),
        "picks": pick_kinds(steps, examples, rate, args.tails[0]),
    }
    triggers = expected_triggers(length, args.tau)
    for budget in args.budgets:
        config = LSAConfig(tau=args.tau, recency_chunks=16, sink_chunks=1, resident_budget=budget)
        sets = lookahead_sets(steps, args.tau, prompt, rate, config)
        tokens, share = decode_with_sets(model, input_ids, length, sets, config)
        result[f"oracle budget {budget}"] = {**answer_scores(tokens, stock, examples), "resident_share": share}
    evidence = [torch.tensor(evidence_chunks(e, rate)) for e in examples]
    for tail in args.tails:
        config = LSAConfig(tau=args.tau, recency_chunks=tail, sink_chunks=1)
        tokens, share = decode_with_sets(model, input_ids, length, [evidence] * triggers, config)
        result[f"evidence tail {tail}"] = {**answer_scores(tokens, stock, examples), "resident_share": share}
    windows = [window_evidence_chunks(answer_evidence(e), task, length, args.tau, rate) for e in examples]
    window_sets = [[torch.tensor(w[trigger]) for w in windows] for trigger in range(triggers)]
    for tail in args.tails:
        config = LSAConfig(tau=args.tau, recency_chunks=tail, sink_chunks=1)
        tokens, share = decode_with_sets(model, input_ids, length, window_sets, config)
        result[f"window evidence tail {tail}"] = {**answer_scores(tokens, stock, examples), "resident_share": share}
    config = LSAConfig(tau=args.tau, recency_chunks=args.tails[0], sink_chunks=1)
    extra = added_chunks(examples, rate, args.fillers, config.recency_chunks)
    extra["most picked"] = most_picked_others(steps, evidence, args.fillers, prompt // rate - config.recency_chunks)
    for kind, chunks in extra.items():
        sets = [torch.tensor(sorted({*e.tolist(), *c})) for e, c in zip(evidence, chunks)]
        tokens, share = decode_with_sets(model, input_ids, length, [sets] * triggers, config)
        scores = answer_scores(tokens, stock, examples)
        result[f"evidence + {args.fillers} {kind}"] = {**scores, "resident_share": share}
    sets = [[torch.tensor(sorted({*w.tolist(), *c})) for w, c in zip(window, extra["filler"])] for window in window_sets]
    tokens, share = decode_with_sets(model, input_ids, length, sets, config)
    scores = answer_scores(tokens, stock, examples)
    result[f"window evidence + {args.fillers} filler"] = {**scores, "resident_share": share}
    return result


def added_chunks(examples, rate: int, count: int, tail: int) -> dict[str, list[list[int]]]:
    """Per example, `count` chunks drawn (seeded by its index) from the filler and from the other statements, both
    between the sink and the tail and before the question."""
    drawn = {"filler": [], "other statements": []}
    for index, example in enumerate(examples):
        end = min(question_start(example), len(example.input_ids) - tail * rate) // rate  # first chunk left out
        statements, evidence = set(statement_chunks(example, rate)), set(evidence_chunks(example, rate))
        pools = {
            "filler": [c for c in range(1, end) if c not in statements],
            "other statements": [c for c in sorted(statements - evidence) if 0 < c < end],
        }
        for kind, pool in pools.items():
            drawn[kind].append(random.Random(index).sample(pool, min(count, len(pool))))
    return drawn


def most_picked_others(steps: list[torch.Tensor], evidence, count: int, tail_start: int) -> list[list[int]]:
    """Per sequence, the `count` chunks outside its evidence, the sink and the first recall's tail that the stock
    run's picks (every layer, the whole answer) chose most often, ties to the newest."""
    picks = torch.cat(steps, dim=1)
    most = []
    for row, kept in zip(picks, evidence):
        counts = torch.bincount(row[(row >= 1) & (row < tail_start)], minlength=tail_start).float()
        counts[kept[kept < tail_start]] = 0
        ranked = torch.argsort(counts * tail_start + torch.arange(tail_start), descending=True)[:count]
        most.append(ranked[counts[ranked] > 0].tolist())
    return most


def print_table(results: dict) -> None:
    print(f"{'task':<12}{'row':<32}{'tokens right':>13}{'same as stock':>14}{'EM':>6}{'resident':>10}")
    for task, rows in results.items():
        touched = rows["touched"]
        print(f"{task:<12}touched by the top-k: {touched['pooled']:.1%} pooled, {touched['per_layer']:.1%} per layer")
        print(f"{'':<12}its picks: " + ", ".join(f"{kind} {share:.1%}" for kind, share in rows["picks"].items()))
        for name, row in rows.items():
            if name in ("touched", "picks"):
                continue
            share = f"{row['resident_share']:.3f}" if "resident_share" in row else "1"
            print(
                f"{'':<12}{name:<32}{row['tokens_right']:>13.3f}{row['same_as_stock']:>14.3f}"
                f"{row['exact_match']:>6.2f}{share:>10}"
            )


def main(argv=None) -> dict:
    args = parse_args(argv)
    model = AutoModelForCausalLM.from_pretrained(args.backbone, dtype=torch.float32).to(args.device).eval()
    results = {task: probe_task(model, task, args) for task in tqdm(LONG_TASK_NAMES, desc="probe")}
    print_table(results)
    if args.out:
        with open(args.out, "w") as file:
            settings = {name: value for name, value in vars(args).items() if name != "out"}
            json.dump({"settings": settings, "results": results}, file, indent=1)
    return results


if __name__ == "__main__":
    main()
