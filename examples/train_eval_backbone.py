"""Train the evaluation backbone (a small DeepSeek-V4) on the synthetic tasks, then print its per-task accuracy
with the stock full cache.

GPU run, stage 1 (3400 steps, about 15 minutes on one H100, bf16; --max-minutes and --resume split it into parts):
    python examples/train_eval_backbone.py --device cuda --output-dir runs/eval-backbone --export-bf16 runs/eval-bf16
Stage 2 (from stage 1's weights, every context at the training length, the weakest tasks twice as often):
    python examples/train_eval_backbone.py --device cuda --init-from runs/eval-bf16 --steps 1500 --dense-steps 0 \
        --ramp-steps 0 --min-length 512 --lr 3e-4 --extra-tasks variable_tracking,common_words \
        --output-dir runs/eval-backbone2 --export-bf16 runs/eval2-bf16
The paper-layout backbone of the long-decoding evaluation (16 layers, 7 CSA) trains in six stages, each from the
bf16 export of the one before, in runs of at most 8 minutes: `bash examples/run_evaluation.sh backbone` runs them,
and its recall_flags, copy_flags, long_flags, long2_flags, window_flags and backbone_flags are the stages' flags
(docs/evaluation.md says why each stage is there; the fifth widens the sliding window with --sliding-window, the
sixth trains under LSA's restriction with --restricted-share, which departs from the paper).
Time a step before a run (median of N steps a phase at --max-length, the projected minutes, peak memory; no
output): the same flags and --time-steps 8, once per --tokens-per-step worth trying.
CPU smoke run (seconds):
    OMP_NUM_THREADS=1 python examples/train_eval_backbone.py --device cpu --size smoke --steps 3 --dense-steps 2 \
        --min-length 128 --max-length 128 --tokens-per-step 256 --eval-lengths 128 --eval-examples 2 \
        --output-dir /tmp/smoke

The same command with --resume continues a run from its last checkpoint (output-dir/checkpoint.pt), and starts
one when there is none. A run stopped by --max-minutes exits with status 75 (EX_TEMPFAIL) before evaluating:
run the command again to go on. The trained model is saved with save_pretrained to output-dir/model, the
accuracy table to output-dir/eval.json.
"""

import argparse
import copy
import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch

from fm_transformers.eval import (
    TrainingConfig,
    evaluate_backbone,
    format_accuracy_table,
    train_backbone,
)
from fm_transformers.eval.backbone import BACKBONE_SIZES
from fm_transformers.eval.backbone_training import time_steps
from fm_transformers.eval.batches import MIXES
from fm_transformers.eval.catalog import TASK_SETS

STOPPED_EARLY = 75  # EX_TEMPFAIL: stopped by --max-minutes with a checkpoint; the same command goes on


def format_step_times(timing: dict, steps: int) -> str:
    phases = ", ".join(f"{phase} {timing[f'{phase}_s']:.3f} s" for phase in ("dense", "sparse") if timing[f"{phase}_s"])
    peak = "" if timing["peak_bytes"] is None else f", peak {timing['peak_bytes'] / 2**30:.1f} GiB"
    return (
        f"a step of {timing['tokens_per_step']} tokens at {timing['context']}: {phases}{peak}; "
        f"{steps} steps: at most {timing['projected_minutes']:.1f} min"
    )


def parse_args() -> argparse.Namespace:
    defaults = TrainingConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", help="checkpoint, trained model and eval.json go here (required to train)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--resume", action="store_true", help="continue from output-dir/checkpoint.pt if present")
    parser.add_argument("--size", choices=sorted(BACKBONE_SIZES), default=defaults.size)
    parser.add_argument("--mix", choices=sorted(MIXES), default=defaults.mix, help="training mix and evaluated task set")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--dense-steps", type=int, default=defaults.dense_steps, help="warm-up with dense CSA")
    parser.add_argument("--min-length", type=int, default=defaults.min_length)
    parser.add_argument("--max-length", type=int, default=defaults.max_length, help="the training length")
    parser.add_argument("--ramp-steps", type=int, default=defaults.ramp_steps, help="steps to reach max-length")
    parser.add_argument("--tokens-per-step", type=int, default=defaults.tokens_per_step)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--kl-weight", type=float, default=defaults.kl_weight)
    parser.add_argument("--grad-clip", type=float, default=defaults.grad_clip)
    parser.add_argument(
        "--sliding-window", type=int, default=None, help="replace the size's sliding window (e.g. a later stage's)"
    )
    parser.add_argument("--init-from", default=None, help="start from this saved backbone (a second training stage)")
    parser.add_argument(
        "--extra-tasks", default="", help="comma-separated evaluation tasks drawn once more per turn of the mix"
    )
    parser.add_argument(
        "--restricted-share", type=float, default=defaults.restricted_share,
        help="LSA-restricted training: the share of long-task examples whose answers pick only among their evidence, "
        "a tail, the sink and random chunks (departs from the paper; 0: off)",
    )
    parser.add_argument(
        "--restricted-random", type=float, default=defaults.restricted_random,
        help="the random share of the other chunks a restricted answer may pick is uniform in [0, this]",
    )
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto", help="auto: bf16 on CUDA")
    parser.add_argument("--compile", action="store_true", help="torch.compile the step (minutes to compile a shape)")
    parser.add_argument("--checkpoint-every", type=int, default=200)
    parser.add_argument("--max-minutes", type=float, default=None, help="stop training (with a checkpoint) after this")
    parser.add_argument("--eval-lengths", default=None, help="comma-separated; default: max-length and twice it")
    parser.add_argument("--eval-examples", type=int, default=50, help="per task and length")
    parser.add_argument("--answer-tokens", type=int, default=None, help="answer length of the long tasks (default 130)")
    parser.add_argument("--export-bf16", default=None, help="also save the trained model here in bf16 (small shards)")
    parser.add_argument(
        "--time-steps", type=int, default=None, metavar="N",
        help="only time N steps of each phase at --max-length (median), print the projected run time, and exit",
    )
    args = parser.parse_args()
    if args.output_dir is None and args.time_steps is None:
        parser.error("--output-dir is required (unless --time-steps)")
    return args


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args()
    precision = args.precision
    if precision == "auto":
        precision = "bf16" if torch.device(args.device).type == "cuda" else "fp32"
    try:
        config = TrainingConfig(
            size=args.size,
            seed=args.seed,
            steps=args.steps,
            dense_steps=args.dense_steps,
            min_length=args.min_length,
            max_length=args.max_length,
            ramp_steps=args.ramp_steps,
            tokens_per_step=args.tokens_per_step,
            lr=args.lr,
            warmup_steps=args.warmup_steps,
            weight_decay=args.weight_decay,
            kl_weight=args.kl_weight,
            grad_clip=args.grad_clip,
            precision=precision,
            init_from=args.init_from,
            extra_tasks=tuple(task for task in args.extra_tasks.split(",") if task),
            mix=args.mix,
            sliding_window=args.sliding_window,
            restricted_share=args.restricted_share,
            restricted_random=args.restricted_random,
        )
        if args.time_steps is not None:
            print(format_step_times(time_steps(config, args.device, args.time_steps, args.compile), config.steps))
            return
        run = train_backbone(
            config, args.output_dir, args.device, args.resume, args.checkpoint_every, args.max_minutes,
            compile=args.compile,
        )
    except (ValueError, FileNotFoundError, FileExistsError) as error:  # bad flags or paths: say so, no traceback
        raise SystemExit(f"error: {error}") from None
    if not run.finished:
        print(f"stopped by --max-minutes at step {run.history[-1]['step'] if run.history else 'start'}: run again to go on")
        raise SystemExit(STOPPED_EARLY)
    if args.export_bf16:  # before evaluating: an evaluation cut short keeps the trained weights
        bf16 = copy.deepcopy(run.model).to(torch.bfloat16)
        bf16.save_pretrained(args.export_bf16, max_shard_size="12MB")
        del bf16
    if args.eval_lengths is None:
        lengths = [config.max_length, 2 * config.max_length]
    else:
        lengths = [int(length) for length in args.eval_lengths.split(",")]
    tasks = TASK_SETS[config.mix]
    sizes = dict(seed=config.seed, precision=precision, tasks=tasks, answer_tokens=args.answer_tokens)
    results = evaluate_backbone(run.model, lengths, args.eval_examples, **sizes)
    dense = evaluate_backbone(run.model, lengths, args.eval_examples, dense_csa=True, **sizes)
    print(f"\nexact-match accuracy (%), stock full cache, {args.eval_examples} examples per cell")
    print(format_accuracy_table(results))
    print("\nthe same with every compressed entry visible to CSA (no native top-k): the indexer's cost is the gap")
    print(format_accuracy_table(dense))
    report = {
        "config": asdict(config),
        "accuracy": {str(n): r for n, r in results.items()},
        "accuracy_dense_csa": {str(n): r for n, r in dense.items()},
    }
    (Path(args.output_dir) / "eval.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
