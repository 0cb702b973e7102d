"""`fm-indexer`: dump labels from a frozen backbone, train a memory indexer, evaluate it, publish it, or convert
the paper's released one.

    fm-indexer dump-labels --model deepseek-ai/DeepSeek-V4-Flash --documents docs.jsonl --output labels/
    fm-indexer train --data labels/ --eval-data heldout/ --output indexer/
    fm-indexer eval --indexer indexer/ --data heldout/
    fm-indexer push --indexer indexer/ --repo-id org/fm-indexer-v4-flash
    fm-indexer convert --official-checkpoint libertywing/FlashMemory-Deepseek-V4 \
        --backbone deepseek-ai/DeepSeek-V4-Flash --output indexer/

`--model tiny` stands for fm_transformers.tiny.tiny_deepseek_v4(seed=--tiny-seed) with its character-level
tokenizer (fm_transformers.tiny.tiny_tokenizer), so the whole pipeline runs offline on a CPU; `convert --backbone
tiny` for its config.

This package is the console script's entry point and imports only the standard library. It lives outside
`fm_transformers` on purpose: importing anything under `fm_transformers` runs that package's `__init__`, which
loads torch and transformers (seconds). So `--help` and a mistyped option answer at once; a subcommand imports
`fm_transformers.training.cli`, where the commands run, only once its arguments parse.
"""

import argparse
import logging

# fm_transformers.indexer.PAPER_TARGET_CSA_ORDINALS, written out so that --help needs no torch; a test keeps the
# two equal.
PAPER_CSA_ORDINALS_HELP = "10 12 20"
# fm_transformers.official.DEFAULT_CHECKPOINT_FILE and OFFICIAL_REPO, likewise.
OFFICIAL_CHECKPOINT_FILE = "checkpoints/top3_R930_joint.pt"
OFFICIAL_REPO = "libertywing/FlashMemory-Deepseek-V4"
LOADERS = ("device", "device-inline", "host")  # training.trainer.LOADERS (a test keeps them equal)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # answered by the subcommand, whose usage lists the options it does take
        args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        from fm_transformers.training.cli import COMMANDS  # torch and transformers load here, not before

        COMMANDS[args.command](args)
    except (ValueError, OSError, ImportError) as error:
        logging.getLogger("fm-indexer").error("%s", error)
        return 2
    return 0


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default, except where there is none to show (None, an off flag)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fm-indexer", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    _add_dump(commands)
    _add_train(commands)
    _add_eval(commands)
    _add_push(commands)
    _add_convert(commands)
    return parser


def _add_dump(commands) -> None:
    parser = commands.add_parser(
        "dump-labels",
        formatter_class=_HelpFormatter,
        help="run the frozen backbone over documents and write label shards",
        description="Teacher-force a DeepSeek-V4 over JSONL documents and store, per trigger step, the hidden "
        "states of the target layers, their frozen indexer keys and the golden lookahead labels. Resumable: run "
        "the same command again to finish an interrupted dump.",
    )
    parser.add_argument("--model", required=True, help="Hub id or local path of a DeepSeek-V4, or 'tiny'")
    parser.add_argument("--tiny-seed", type=int, default=0, help="seed of the tiny backbone (with --model tiny)")
    parser.add_argument("--documents", required=True, help='JSONL, one {"text": ...} or {"input_ids": [...]} a line')
    parser.add_argument("--output", required=True, help="directory for the shards and manifest.json")
    parser.add_argument(
        "--layers",
        type=int,
        nargs="+",
        default=None,
        help="target CSA layers, as model layer indices (default: the paper's, CSA ordinals "
        f"{PAPER_CSA_ORDINALS_HELP}: model layers 22 26 42 of V4-Flash; the same relative depths on other backbones)",
    )
    parser.add_argument("--tau", type=int, default=64, help="lookahead window and trigger spacing, in tokens")
    parser.add_argument("--nucleus", type=float, default=0.6, help="probability mass of the per-layer nucleus")
    parser.add_argument("--vote", type=int, default=3, help="CSA layers a chunk must survive in to be golden")
    parser.add_argument("--warmup", type=int, default=None, help="first trigger step (default: sliding window)")
    parser.add_argument("--chunk-size", type=int, default=1024, help="tokens per forward pass")
    parser.add_argument(
        "--batch-size", type=int, default=1, help="documents per forward pass (memory grows with it; small models gain)"
    )
    parser.add_argument("--docs-per-shard", type=int, default=16, help="documents per safetensors shard")
    parser.add_argument(
        "--max-tokens", type=int, default=None, help="truncate documents to this many tokens (default: whole documents)"
    )
    parser.add_argument("--dtype", default="auto", help="backbone dtype: auto, bfloat16, float32")
    parser.add_argument("--device-map", default=None, help="device_map for from_pretrained (e.g. auto, cuda)")
    parser.set_defaults(parser=parser)


def _add_train(commands) -> None:
    parser = commands.add_parser(
        "train",
        formatter_class=_HelpFormatter,
        help="train a memory indexer from label shards (the backbone is never loaded)",
        description="Train a memory indexer on label shards with accelerate (CPU, one GPU, or `accelerate launch` "
        "for several), save it with save_pretrained in --output and evaluate it on --eval-data.",
    )
    parser.add_argument("--data", required=True, help="label directory from dump-labels")
    parser.add_argument("--eval-data", default=None, help="held-out label directory, same backbone")
    parser.add_argument("--output", required=True, help="directory for checkpoints and the trained indexer")
    parser.add_argument(
        "--layers", type=int, nargs="+", default=None, help="target layers, model layer indices (default: all dumped)"
    )
    parser.add_argument("--num-heads", type=int, default=128, help="indexer heads per target layer")
    parser.add_argument("--rank", type=int, default=2048, help="low-rank query dimension")
    parser.add_argument("--init-from", default=None, help="start from this indexer (local dir or Hub id)")
    parser.add_argument("--lora-r", type=int, default=None, help="adapt --init-from with LoRA of this rank (PEFT)")
    parser.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: 2 x --lora-r)")
    parser.add_argument("--epochs", type=int, default=1, help="passes over --data")
    parser.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    parser.add_argument("--batch-size", type=int, default=64, help="trigger steps per optimizer step")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate after warmup, decayed on a cosine")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    parser.add_argument("--warmup-steps", type=int, default=0, help="learning-rate warmup steps")
    parser.add_argument("--negative-ratio", type=float, default=3.0, help="sampled negatives per positive")
    parser.add_argument("--loss", choices=("focal", "bce"), default="focal", help="selection loss")
    parser.add_argument("--gamma", type=float, default=2.0, help="focal loss gamma")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    parser.add_argument("--seed", type=int, default=0, help="seed of initialization, data order and negative sampling")
    parser.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps; 0 only at the end")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    parser.add_argument("--threshold", type=float, default=0.5, help="selection threshold for the evaluation")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is there")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the training step (on an H200: 8,400-9,600 samples/s against 5,100 "
                             "without)")
    parser.add_argument("--loader", choices=LOADERS, default="device",
                        help="device: batches made on the GPU by a thread of their own (best for the eager step); "
                             "device-inline: the same batches made on the training thread (as fast or faster with "
                             "--compile on an H200, 0.8 GiB less memory); host: the per-sample CPU reference")
    parser.add_argument("--num-workers", type=int, default=0,
                        help="DataLoader worker processes of the host loader")
    parser.set_defaults(parser=parser)


def _add_eval(commands) -> None:
    parser = commands.add_parser(
        "eval",
        formatter_class=_HelpFormatter,
        help="evaluate an indexer on held-out label shards",
        description="Precision, recall and F1 at the threshold against the golden labels, mean resident "
        "fraction, and recall of the chunks the native top-k used, next to a recency selector of the same size.",
    )
    parser.add_argument("--indexer", required=True, help="indexer directory or Hub repo id")
    parser.add_argument("--data", required=True, help="label directory from dump-labels")
    parser.add_argument("--threshold", type=float, default=0.5, help="a chunk is selected when its score reaches this")
    parser.add_argument("--device", default="cpu", help="device to score on (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--output", default=None, help="also write the metrics to this JSON file")
    parser.set_defaults(parser=parser)


def _add_push(commands) -> None:
    parser = commands.add_parser(
        "push",
        formatter_class=_HelpFormatter,
        help="write the Hub repo folder (weights, config, card) and upload it",
        description="Fill model_cards/indexer_card.md from the indexer and its training summary and upload the "
        "repo with huggingface_hub; with --local-dir, only write the folder.",
    )
    parser.add_argument("--indexer", required=True, help="directory written by fm-indexer train")
    parser.add_argument("--repo-id", required=True, help="Hub repo, e.g. org/fm-indexer-v4-flash")
    parser.add_argument("--local-dir", default=None, help="write the repo folder here instead of uploading")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    parser.add_argument("--token", default=None, help="Hub token (default: the logged-in one)")
    parser.add_argument(
        "--card-template", default=None, help="card template (default: the package's model_cards/indexer_card.md)"
    )
    parser.set_defaults(parser=parser)


def _add_convert(commands) -> None:
    parser = commands.add_parser(
        "convert",
        formatter_class=_HelpFormatter,
        help="turn the paper's released indexer checkpoint into an indexer directory",
        description=f"Read the memory indexer released with the paper ({OFFICIAL_REPO}, MIT licence), check it "
        "against the backbone and write an indexer directory (config, weights, model card) that "
        "attach_memory_indexer and AutoLSAModelForCausalLM load.",
    )
    parser.add_argument(
        "--official-checkpoint",
        required=True,
        help="a .pt/.pth/.safetensors file, or a local directory or Hub repo in the release's layout "
        f"(e.g. {OFFICIAL_REPO})",
    )
    parser.add_argument(
        "--checkpoint-file", default=OFFICIAL_CHECKPOINT_FILE, help="file inside a directory or Hub repo checkpoint"
    )
    parser.add_argument("--backbone", required=True, help="Hub id or local path of the DeepSeek-V4 it serves, or 'tiny'")
    parser.add_argument("--output", required=True, help="directory for the converted indexer")
    parser.set_defaults(parser=parser)
