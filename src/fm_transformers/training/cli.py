"""The subcommands of `fm-indexer`. The stdlib-only front end (the `fm_indexer` package) parses the arguments and
only then imports this module, so torch and transformers load for a command that runs, not for `--help`.
Each `run_*` takes the argparse namespace of its subcommand.

`python -m fm_transformers.training.cli` runs the command as well, through the same front end.
"""

import json
import logging
import sys
from pathlib import Path

from accelerate import PartialState
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from fm_indexer import main

from ..indexer import PAPER_TARGET_LAYERS, MemoryIndexerModel
from ..locate import locate_pretrained
from ..tiny import tiny_deepseek_v4, tiny_tokenizer
from .documents import read_jsonl
from .dump import DumpConfig, dump_labels
from .evaluate import evaluate
from .labels import LabelConfig
from .push import push
from .shards import LabelShards
from .trainer import TrainConfig, check_indexer_fits, train

TINY = "tiny"
logger = logging.getLogger("fm-indexer")


def run_dump_labels(args) -> None:
    config = DumpConfig(
        target_layers=tuple(args.layers or PAPER_TARGET_LAYERS),
        labels=LabelConfig(tau=args.tau, nucleus=args.nucleus, vote=args.vote, warmup=args.warmup),
        chunk_size=args.chunk_size,
        docs_per_shard=args.docs_per_shard,
    )
    model, name, tokenizer = load_backbone(args.model, args.tiny_seed, args.dtype, args.device_map)
    documents = read_jsonl(args.documents, tokenizer, args.max_tokens)
    manifest = dump_labels(model, documents, args.output, config, name)
    logger.info("labels of %d documents in %s", len(manifest["documents"]), args.output)


def load_backbone(model: str, tiny_seed: int = 0, dtype: str = "auto", device_map: str | None = None):
    """(model, name for the manifest, tokenizer); the config is checked before any weight is loaded."""
    if model == TINY:
        return tiny_deepseek_v4(seed=tiny_seed), f"fm_transformers.tiny(seed={tiny_seed})", tiny_tokenizer()
    model = locate_pretrained(model)
    config = AutoConfig.from_pretrained(model)
    if config.model_type != "deepseek_v4":
        raise ValueError(f"{model} is a {config.model_type!r} model: labels need a DeepSeek-V4 backbone")
    backbone = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, device_map=device_map).eval()
    return backbone, model, _LazyTokenizer(model)


class _LazyTokenizer:
    """Loads the model's tokenizer on first use, so documents given as input_ids need no tokenizer files."""

    def __init__(self, name: str):
        self.name = name
        self._tokenizer = None

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        if self._tokenizer is None:
            self._tokenizer = AutoTokenizer.from_pretrained(self.name)
        return self._tokenizer(text, add_special_tokens=add_special_tokens)


def run_train(args) -> None:
    config = TrainConfig(
        data=args.data,
        output_dir=args.output,
        eval_data=args.eval_data,
        layers=args.layers,
        num_heads=args.num_heads,
        rank=args.rank,
        init_from=locate_pretrained(args.init_from) if args.init_from else None,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        negative_ratio=args.negative_ratio,
        loss=args.loss,
        gamma=args.gamma,
        bf16=args.bf16,
        seed=args.seed,
        save_every=args.save_every,
        resume=args.resume,
        threshold=args.threshold,
        cpu=args.cpu,
        num_workers=args.num_workers,
    )
    summary = train(config)
    if PartialState().is_main_process:
        _print_json({"output": args.output, "steps": summary["steps"], "metrics": summary["metrics"]})


def run_eval(args) -> None:
    location = locate_pretrained(args.indexer)
    shards = LabelShards(args.data)
    model = MemoryIndexerModel.from_pretrained(location).to(args.device)
    check_indexer_fits(model, shards)
    metrics = evaluate(model, shards, args.threshold)
    if args.output:
        Path(args.output).write_text(json.dumps(metrics, indent=2))
    _print_json(metrics)


def run_push(args) -> None:
    where = push(args.indexer, args.repo_id, args.local_dir, args.private, args.token, args.card_template)
    logger.info("indexer repo written to %s", where)


def _print_json(payload: dict) -> None:
    sys.stdout.write(json.dumps(payload, indent=2) + "\n")


COMMANDS = {"dump-labels": run_dump_labels, "train": run_train, "eval": run_eval, "push": run_push}

if __name__ == "__main__":
    sys.exit(main())
