"""The subcommands of `fm-indexer`. The stdlib-only front end (the `fm_indexer` package) parses the arguments and
only then imports this module, so torch and transformers load for a command that runs, not for `--help`.
Each `run_*` takes the argparse namespace of its subcommand; `fm-indexer` or `python -m fm_indexer` runs them.
"""

import json
import logging
import sys
from pathlib import Path

from accelerate import PartialState
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer


from ..indexer import MemoryIndexerModel, default_target_layers
from ..locate import locate_pretrained
from ..tiny import tiny_deepseek_v4, tiny_deepseek_v4_config, tiny_tokenizer
from .convert import write_official_indexer
from .documents import read_jsonl
from .dump import DumpConfig, dump_labels
from .evaluate import evaluate
from .labels import LabelConfig
from .push import push
from .shards import LabelShards
from .trainer import TrainConfig, check_indexer_fits, train

TINY = "tiny"
TINY_CONFIG_NAME = "fm_transformers.tiny.tiny_deepseek_v4_config()"  # what `convert --backbone tiny` records
logger = logging.getLogger("fm-indexer")


def run_dump_labels(args) -> None:
    model, name, tokenizer = load_backbone(args.model, args.tiny_seed, args.dtype, args.device_map)
    config = DumpConfig(
        target_layers=tuple(args.layers or default_target_layers(model.config)),
        labels=LabelConfig(tau=args.tau, nucleus=args.nucleus, vote=args.vote, warmup=args.warmup),
        chunk_size=args.chunk_size,
        batch_size=args.batch_size,
        docs_per_shard=args.docs_per_shard,
    )
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
        loader=args.loader,
        num_workers=args.num_workers,
        compile=args.compile,
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


def run_convert(args) -> None:
    backbone = tiny_deepseek_v4_config() if args.backbone == TINY else args.backbone
    model = MemoryIndexerModel.from_official(args.official_checkpoint, backbone, args.checkpoint_file)
    if args.backbone == TINY:
        model.config.base_model_name_or_path = TINY_CONFIG_NAME
    source = args.official_checkpoint
    if not Path(source).expanduser().is_file():
        source = f"{source} ({args.checkpoint_file})"
    write_official_indexer(model, args.output, source)
    logger.info("indexer of layers %s written to %s", model.config.layers, args.output)


def _print_json(payload: dict) -> None:
    sys.stdout.write(json.dumps(payload, indent=2) + "\n")


COMMANDS = {
    "dump-labels": run_dump_labels,
    "train": run_train,
    "eval": run_eval,
    "push": run_push,
    "convert": run_convert,
}

