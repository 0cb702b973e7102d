"""Does a fresh evaluation backbone learn to copy at one context length? A few minutes that tell whether a
curriculum can leave the loss plateau before a long run is spent on it (docs/evaluation.md, second backbone run).

    python examples/copy_learning_check.py --size paper --context 64 --lr 1e-3 --steps 300 --device cuda
    python examples/copy_learning_check.py --size paper --context 256 --lr 1e-3 --steps 300 --device cuda
    python examples/copy_learning_check.py --size paper --context 64 --vocabulary long --tokens-per-step 16384
    python examples/copy_learning_check.py --size paper --context 64 --embeddings untied --tokens-per-step 16384

One task, associative recall with 16-token pairs, every step at --context tokens with dense CSA, through the
backbone stage's own training step (backbone_training.train_step). Prints the mean answer loss and answer-token
accuracy over each --report-every steps; chance accuracy is about 1% (short vocabulary). Nothing is written.
"""

import argparse
import time
from dataclasses import dataclass

import torch

from fm_transformers.eval.backbone import BACKBONE_SIZES, build_eval_backbone, eval_backbone_config
from fm_transformers.eval.backbone_training import (
    TrainingConfig,
    check_vocabulary,
    initial_model,
    make_optimizer,
    train_step,
)
from fm_transformers.eval.batches import Batch, make_batch
from fm_transformers.eval.distillation import IndexerDistillation
from fm_transformers.eval.vocab import VOCABULARIES


@dataclass(frozen=True)
class CopyOnlyConfig(TrainingConfig):
    """The backbone stage's config, every batch the copy task at one length, keys and values drawn from
    `vocabulary` (vocab.VOCABULARIES)."""

    vocabulary: str = "short"

    def __post_init__(self):
        super().__post_init__()
        check_vocabulary(self.size, max(VOCABULARIES[self.vocabulary][1]) + 1, f"the {self.vocabulary} vocabulary")

    def batch_for(self, step: int) -> Batch:
        task = (("associative_recall", {"tokens_per_pair": 16, "vocabulary": self.vocabulary}),)
        return make_batch(self.seed, step, self.max_length, max(1, self.tokens_per_step // self.max_length), task)


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(BACKBONE_SIZES), default="paper")
    parser.add_argument("--context", type=positive, default=64, help="tokens a context (the paper size's window: 64)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--vocabulary", choices=sorted(VOCABULARIES), default="short",
        help="content ids of keys and values: short (256 ids), long (the long tasks' 1,520 ids) or long-swapped "
        "(keys from the long values, values from the long keys)",
    )
    parser.add_argument("--steps", type=positive, default=300)
    parser.add_argument("--tokens-per-step", type=positive, default=8192)
    parser.add_argument("--report-every", type=positive, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init-from", default=None, help="a saved backbone to start from (default: fresh weights)")
    parser.add_argument(
        "--embeddings", choices=("tied", "untied"), default=None,
        help="fresh weights whose output layer is the input embedding (tied: copying needs no output row learned "
        "per id) or a layer of its own (untied); default: the size's own (paper: tied)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    try:
        config = CopyOnlyConfig(
            size=args.size, seed=args.seed, steps=args.steps, dense_steps=args.steps, min_length=args.context,
            max_length=args.context, ramp_steps=0, tokens_per_step=args.tokens_per_step, lr=args.lr, warmup_steps=20,
            precision="bf16" if device.type == "cuda" else "fp32", vocabulary=args.vocabulary,
            init_from=args.init_from,
        )
    except ValueError as error:  # e.g. the long vocabulary on a size whose vocabulary is too small
        raise SystemExit(f"error: {error}") from None
    torch.manual_seed(args.seed)
    if args.embeddings and args.init_from:
        raise SystemExit("error: --embeddings builds fresh weights; it cannot start from --init-from")
    try:
        if args.embeddings:
            backbone = eval_backbone_config(args.size, tie_word_embeddings=args.embeddings == "tied")
            model = build_eval_backbone(backbone, seed=args.seed)
        else:
            model = initial_model(config)
        model = model.to(device)
    except (ValueError, FileNotFoundError) as error:  # --init-from not a backbone of this size
        raise SystemExit(f"error: {error}") from None
    optimizer = make_optimizer(model, config)
    tied = "tied" if model.config.tie_word_embeddings else "untied"
    print(f"{args.size}, {tied} embeddings, {args.context}-token contexts, lr {args.lr}, {args.vocabulary} "
          "vocabulary: answer loss and answer-token accuracy")
    start, window = time.perf_counter(), []
    with IndexerDistillation(model) as distillation:
        for step in range(args.steps):
            window.append(train_step(model, distillation, optimizer, config, step, device))
            if len(window) == args.report_every or step == args.steps - 1:
                loss = sum(metrics["loss"] for metrics in window) / len(window)
                accuracy = sum(metrics["answer_token_acc"] for metrics in window) / len(window)
                seconds = (time.perf_counter() - start) / (step + 1)
                print(f"step {step + 1:5d}  loss {loss:.3f}  accuracy {accuracy:6.1%}  ({seconds:.2f} s a step)")
                window = []


if __name__ == "__main__":
    main()
