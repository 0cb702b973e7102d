"""Full cache / LSA / recency-only / random at the same GPU budget on the synthetic tasks (REFERENCE.md section 4).

    python examples/compare_methods.py --backbone DIR --indexer DIR --lengths 512,1024,2048,4096 --out compare.json \
        --plot compare.png

Lengths run one after another; to spread them over GPUs or processes, run one length per command (its own
--out) and join the results: `python examples/compare_methods.py --merge a.json b.json --out all.json --plot all.png`.
Runs of the same lengths on other example draws (--seed) pool into one table of their mean: `--pool s0.json
s1.json s2.json` (each draw has as many examples, so the mean accuracy is the accuracy over all of them).

--backbone: the evaluation backbone trained by examples/train_eval_backbone.py; --indexer: its memory indexer
trained with `fm-indexer`. Without them (--smoke) it runs on an untrained smoke-size backbone and a fresh indexer:
that checks the machinery, not accuracy. Prints exact-match accuracy per task and method, the measured CSA
bytes on the device per method and the chunks each fetched from the pool per token; writes JSON and a plot.

With --refresh-layers (default 2,7) two more rows run: LSA with those CSA layers refreshing the resident set on
a miss (LSAConfig.refresh_layers), and the same refresh without the memory indexer ("refresh only").
"""

import argparse
import json

import torch
from transformers import AutoModelForCausalLM

import fm_transformers as fm
from fm_transformers.eval import TASK_NAMES, build_eval_backbone, eval_backbone_config, evaluate_accuracy, make_examples
from fm_transformers.eval.methods import comparison_methods


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", help="trained evaluation backbone (a save_pretrained dir)")
    parser.add_argument("--indexer", help="its memory indexer (a save_pretrained dir or Hub id)")
    parser.add_argument("--smoke", action="store_true", help="untrained smoke-size backbone and fresh indexer")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="join the results of earlier runs, run nothing")
    parser.add_argument("--pool", nargs="+", metavar="JSON", help="average runs of other draws (--seed), run nothing")
    parser.add_argument("--lengths", default="512,1024,2048,4096", help="context lengths in tokens")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="backbone dtype (auto: as saved)"
    )
    parser.add_argument("--examples", type=int, default=20, help="examples per task and length")
    parser.add_argument("--seed", type=int, default=0, help="examples of length N are drawn with seed N + 1000003 * SEED")
    parser.add_argument("--budget", type=float, default=0.1, help="resident budget, a fraction of the history")
    parser.add_argument("--tau", type=int, default=16)
    # Under a budget, a low threshold lets LSA fill the budget by score, as recency and random fill it; the
    # 64-token sliding window already covers the newest tokens, so two newest chunks are enough of a tail.
    parser.add_argument("--threshold", type=float, default=0.1, help="LSA keeps chunks scoring at least this")
    parser.add_argument("--recency-chunks", type=int, default=2, help="newest chunks always resident (in the budget)")
    # Retrieval in the evaluation backbone runs through CSA layers 2 and 7 (see the README). Their indexer keys on
    # the device cost 10% of the full CSA bytes here, so the refresh rows get a smaller budget for the same bytes,
    # and no recency tail or sink: a refresh fetches what the sliding window does not cover when it is used.
    parser.add_argument(
        "--refresh-layers", default="2,7", help="CSA layers of the lsa+refresh and refresh-only rows ('' leaves them out)"
    )
    parser.add_argument("--refresh-budget", type=float, default=0.05, help="resident budget of the refresh rows")
    parser.add_argument("--out", default="compare.json")
    parser.add_argument("--plot", default="compare.png")
    args = parser.parse_args()
    if args.merge and args.pool:
        parser.error("pass --merge or --pool, not both")
    if args.merge:
        results = merge(args.merge)
    elif args.pool:
        results = pool(args.pool)
    elif args.smoke or (args.backbone and args.indexer):
        results = run(args)
    else:
        parser.error("pass --backbone and --indexer, --smoke, --merge or --pool")
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=1)
    plot(results, args.plot)
    print_table(results)


def run(args) -> dict:
    if args.smoke:
        model = build_eval_backbone(eval_backbone_config("smoke"), seed=0).to(args.device).eval()
        indexer = fm.MemoryIndexerModel.from_backbone(model, layers=[2, 4], num_heads=4, rank=16)
    else:
        dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
        model = AutoModelForCausalLM.from_pretrained(args.backbone, dtype=dtype).to(args.device).eval()
        indexer = fm.MemoryIndexerModel.from_pretrained(args.indexer)
    fm.attach_memory_indexer(model, indexer)
    lsa_config = {
        "tau": args.tau,
        "threshold": args.threshold,
        "resident_budget": args.budget,
        "recency_chunks": args.recency_chunks,
        "sink_chunks": 1,
    }
    refresh_config = None
    if args.refresh_layers:
        layers = [int(value) for value in args.refresh_layers.split(",")]
        refresh_config = {
            "refresh_layers": layers, "resident_budget": args.refresh_budget, "recency_chunks": 0, "sink_chunks": 0
        }
    results = {}
    for length in [int(value) for value in args.lengths.split(",")]:
        seed = length + 1_000_003 * args.seed
        examples = [ex for task in TASK_NAMES for ex in make_examples(task, length, args.examples, seed=seed)]
        methods = comparison_methods(fm.attached_memory_indexer(model), lsa_config, refresh_config=refresh_config)
        results[length] = {}
        for method in methods:
            accuracy = evaluate_accuracy(model, examples, method.generate)
            results[length][method.name] = {
                "accuracy": accuracy,
                "csa_device_bytes": method.mean_csa_bytes(),
                "fetched_per_token": method.fetched_per_token(),
            }
    return results


def merge(paths: list[str]) -> dict:
    """Results of several runs by context length (JSON keys are strings); a length found twice is an error."""
    results = {}
    for path in paths:
        for length, methods in load_results(path).items():
            if length in results:
                raise SystemExit(f"context length {length} appears in more than one of {paths}")
            results[length] = methods
    return dict(sorted(results.items()))


def load_results(path: str) -> dict:
    """A results JSON by context length (its keys are strings there)."""
    with open(path) as handle:
        return {int(length): methods for length, methods in json.load(handle).items()}


def pool(paths: list[str]) -> dict:
    """The mean of runs over other example draws: every run must hold the same lengths, methods, tasks and
    measures (a missing one would bias the mean); accuracy, CSA bytes and fetches are averaged entry by entry."""
    runs = [load_results(path) for path in paths]

    def shape(run):
        return {n: {m: (sorted(e), sorted(e["accuracy"])) for m, e in methods.items()} for n, methods in run.items()}

    for path, run in zip(paths[1:], runs[1:]):
        if shape(run) != shape(runs[0]):
            raise SystemExit(f"{path} has other lengths, methods, tasks or measures than {paths[0]}: cannot pool them")

    def mean(values):
        return sum(values) / len(values)

    pooled = {}
    for length in sorted(runs[0]):
        pooled[length] = {}
        for name, first in runs[0][length].items():
            entries = [run[length][name] for run in runs]
            entry = {
                "accuracy": {task: mean([e["accuracy"][task] for e in entries]) for task in first["accuracy"]},
                "csa_device_bytes": mean([e["csa_device_bytes"] for e in entries]),
            }
            if "fetched_per_token" in first:
                entry["fetched_per_token"] = mean([e["fetched_per_token"] for e in entries])
            pooled[length][name] = entry
    return pooled


def mean_accuracy(entry) -> float:
    return 100 * sum(entry["accuracy"].values()) / len(entry["accuracy"])


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted(results)
    figure, axis = plt.subplots(figsize=(7.5, 4))
    markers = "osD^vx"
    for index, name in enumerate(results[lengths[0]]):
        axis.plot(
            lengths, [mean_accuracy(results[n][name]) for n in lengths], label=name, marker=markers[index % len(markers)],
            linestyle="--" if name == "refresh only" else "-", fillstyle="none" if name == "refresh only" else "full",
        )  # "refresh only" often lies on "lsa+refresh": dashed and hollow, it stays visible on top
    axis.set_xscale("log", base=2)
    axis.set_xticks(lengths, [str(n) for n in lengths])
    axis.set_xlabel("context length (tokens)")
    axis.set_ylabel("mean exact match (%)")
    axis.set_title("Full / LSA / recency / random at the same GPU bytes")
    axis.legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def print_table(results):
    """One row per length and method; 'fetched' is chunks fetched from the pool per generated token and CSA layer."""
    print("length | method       | mean EM % | CSA device KiB | vs full | fetched | per task EM %")
    for length, methods in results.items():
        full_bytes = methods["full"]["csa_device_bytes"]
        for name, entry in methods.items():
            tasks = " ".join(f"{task}={100 * value:.0f}" for task, value in entry["accuracy"].items())
            share = entry["csa_device_bytes"] / full_bytes if full_bytes else float("nan")
            kib = entry["csa_device_bytes"] / 1024
            fetched = f"{entry['fetched_per_token']:7.2f}" if "fetched_per_token" in entry else f"{'-':>7}"
            print(f"{length:6d} | {name:12s} | {mean_accuracy(entry):9.1f} | {kib:14.1f} | {share:7.2f} | {fetched} | {tasks}")


if __name__ == "__main__":
    main()
