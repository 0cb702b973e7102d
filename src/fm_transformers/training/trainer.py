"""Backbone-free training of a memory indexer from label shards, with accelerate.

Only the memory indexer exists in this process: its key side (the native indexer keys) and its inputs (hidden
states) were stored by the dump, and the backbone is known only by the dimensions in the manifest. The same
command runs on the CPU, one GPU, or several (`accelerate launch`). Checkpoints hold the model, optimizer,
scheduler and RNG states plus the position in the data, so a resumed run continues where it stopped.
"""

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from ..indexer import MemoryIndexerModel
from .dataset import DocumentBlockSampler, TriggerDataset, collate_triggers
from .evaluate import evaluate
from .lora import add_lora, is_lora, merge_lora
from .losses import LOSSES, indexer_loss
from .shards import LabelShards, backbone_config

logger = logging.getLogger(__name__)

SUMMARY = "training_summary.json"
STATE = "trainer_state.json"
# Run plumbing, left out of the summary that the model card shows.
NOT_HYPERPARAMETERS = (
    "data",
    "eval_data",
    "output_dir",
    "resume",
    "cpu",
    "save_every",
    "keep_checkpoints",
    "num_workers",
)
# Settings that fix the shape of the model and the data order: a resume with other values cannot continue.
RESUME_FIXED = ("data", "layers", "num_heads", "rank", "init_from", "lora_r", "batch_size", "seed")


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run; the defaults are the paper's release where it gives them."""

    data: str
    output_dir: str
    eval_data: str | None = None
    layers: list[int] | None = None  # None: every target layer of the dump
    num_heads: int = 128
    rank: int = 2048
    init_from: str | None = None  # an existing indexer (local dir or Hub id) to start from
    lora_r: int | None = None
    lora_alpha: float | None = None
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    negative_ratio: float = 3.0
    loss: str = "focal"
    gamma: float = 2.0
    bf16: bool = False
    seed: int = 0
    save_every: int = 0  # steps between checkpoints; 0 saves only at the end
    keep_checkpoints: int = 2
    resume: bool = False
    threshold: float = 0.5
    cpu: bool = False
    num_workers: int = 0

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}: choose one of {LOSSES}")
        if self.lora_r is not None and self.init_from is None:
            raise ValueError("--lora-r adapts an existing indexer: pass --init-from with the indexer to adapt")
        if self.batch_size < 1 or self.epochs < 1 or (self.max_steps is not None and self.max_steps < 1):
            raise ValueError("batch_size, epochs and max_steps must be positive")


def build_indexer(config: TrainConfig, shards: LabelShards):
    """A fresh indexer for the dump's backbone, or the one in init_from after checking it fits that backbone."""
    identity = shards.backbone
    if config.init_from is None:
        return MemoryIndexerModel.from_backbone(
            backbone_config(identity),
            layers=config.layers or shards.target_layers,
            num_heads=config.num_heads,
            rank=config.rank,
            base_model_name_or_path=identity["name_or_path"],
        )
    model = MemoryIndexerModel.from_pretrained(config.init_from)
    check_indexer_fits(model, shards)
    if config.layers and sorted(config.layers) != sorted(model.config.layers):
        raise ValueError(
            f"{config.init_from} has layers {model.config.layers}, not {config.layers}: leave --layers out "
            f"when starting from an existing indexer"
        )
    return model


def check_indexer_fits(model, shards: LabelShards) -> None:
    """Refuse an indexer made for another backbone than the one that made these labels."""
    model.config.check_compatible(backbone_config(shards.backbone))
    ours, theirs = model.config.base_model_name_or_path, shards.backbone["name_or_path"]
    if ours and theirs and ours != theirs:
        logger.warning(
            "the indexer names backbone %s but the labels in %s come from %s: the dimensions match, so this "
            "goes on; make sure they are the same weights",
            ours,
            shards.directory,
            theirs,
        )


class _AllLayers(torch.nn.Module):
    """Every target layer in one forward: under DDP (several GPUs) one forward per backward is the rule."""

    def __init__(self, indexer, layers: list[int]):
        super().__init__()
        self.indexer = indexer
        self.layers = layers

    def forward(self, hidden: dict, positions: torch.Tensor, keys: dict) -> dict:
        """hidden {layer: (1, batch, hidden)}, positions (1, batch), keys {layer: (1, batch, n, head_dim)}."""
        return {layer: self.indexer(layer, hidden[layer], positions, keys[layer]) for layer in self.layers}


@dataclass
class _Run:
    """Everything a training loop touches, prepared by accelerate."""

    model: _AllLayers
    optimizer: torch.optim.Optimizer
    scheduler: object
    loader: DataLoader
    dataset: TriggerDataset
    layers: list[int]
    total_steps: int  # optimizer steps of this process


def train(config: TrainConfig) -> dict:
    """Train, save the indexer with save_pretrained in output_dir, evaluate; returns the run summary."""
    output_dir = Path(config.output_dir)
    shards = LabelShards(config.data)
    eval_shards = LabelShards(config.eval_data) if config.eval_data else None
    if eval_shards is not None:
        shards.check_same_backbone(eval_shards)
    _prepare_output(output_dir, config)
    accelerator = Accelerator(mixed_precision="bf16" if config.bf16 else "no", cpu=config.cpu)
    set_seed(config.seed)
    run = _setup(accelerator, config, shards)
    step = _resume(accelerator, output_dir) if config.resume else 0
    step, losses = _loop(accelerator, run, config, step)
    if not (config.save_every and step % config.save_every == 0):
        _save_checkpoint(accelerator, output_dir, step, config.keep_checkpoints)
    return _finish(accelerator, run.model, config, shards, eval_shards, step, losses)


def _setup(accelerator: Accelerator, config: TrainConfig, shards: LabelShards) -> _Run:
    model = build_indexer(config, shards)
    model.config.tau = shards.manifest["labels"].get("tau")  # checked against LSAConfig.tau when it is used
    layers = [int(layer) for layer in model.config.layers]
    if config.lora_r is not None:
        model = add_lora(model, config.lora_r, config.lora_alpha)
    dataset = TriggerDataset(shards, layers, config.negative_ratio, config.seed)
    sampler = DocumentBlockSampler(dataset, config.seed)
    loader = DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=sampler,
        collate_fn=collate_triggers,
        num_workers=config.num_workers,
    )
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    model, optimizer, loader = accelerator.prepare(_AllLayers(model, layers), optimizer, loader)
    total_steps = config.max_steps or config.epochs * len(loader)  # len(loader): this process's share
    # accelerate steps a prepared scheduler once per process at every optimizer step
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, config.warmup_steps * accelerator.num_processes, total_steps * accelerator.num_processes
    )
    scheduler = accelerator.prepare(scheduler)
    logger.info("training %d parameters on %d trigger steps", sum(p.numel() for p in trainable), len(dataset))
    return _Run(model, optimizer, scheduler, loader, dataset, layers, total_steps)


def _loop(accelerator: Accelerator, run: _Run, config: TrainConfig, step: int) -> tuple[int, list[float]]:
    """Optimizer steps from `step` to run.total_steps; epochs and the position inside one follow from the step."""
    losses = []
    output_dir = Path(config.output_dir)
    with tqdm(total=run.total_steps, initial=step, desc="train", disable=not accelerator.is_main_process) as bar:
        while step < run.total_steps:
            epoch, done_in_epoch = divmod(step, len(run.loader))
            run.loader.set_epoch(epoch)  # accelerate's loader passes it to the sampler, and would reset it otherwise
            run.dataset.set_epoch(epoch)
            batches = accelerator.skip_first_batches(run.loader, done_in_epoch) if done_in_epoch else run.loader
            for batch in batches:
                loss = _batch_loss(run.model, batch, run.layers, config)
                accelerator.backward(loss)
                run.optimizer.step()
                run.scheduler.step()
                run.optimizer.zero_grad()
                step += 1
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                if config.save_every and step % config.save_every == 0:
                    _save_checkpoint(accelerator, output_dir, step, config.keep_checkpoints)
                if step >= run.total_steps:
                    break
    return step, losses


def _batch_loss(model, batch: dict, layers: list[int], config: TrainConfig) -> torch.Tensor:
    """Each target layer learns the whole positive set on its own: at inference any one of them may select."""
    dtype = next(model.parameters()).dtype
    hidden = {layer: batch["hidden"][layer].unsqueeze(0).to(dtype) for layer in layers}
    keys = {layer: batch["keys"][layer].unsqueeze(0) for layer in layers}
    logits = model(hidden, batch["positions"].unsqueeze(0), keys)  # {layer: (1, batch, candidates)}
    losses = [
        indexer_loss(logits[layer][0], batch["targets"], batch["mask"], config.loss, config.gamma) for layer in layers
    ]
    return sum(losses) / len(layers)


def _prepare_output(output_dir: Path, config: TrainConfig) -> None:
    saved = output_dir / "train_config.json"
    if config.resume:
        if not saved.is_file():
            raise FileNotFoundError(f"nothing to resume in {output_dir}: run without --resume")
        previous = json.loads(saved.read_text())
        changed = [key for key in RESUME_FIXED if previous.get(key) != asdict(config).get(key)]
        if changed:
            raise ValueError(f"cannot resume with other {', '.join(changed)}: use the first run's values")
        return
    if (output_dir / "checkpoints").exists():
        raise FileExistsError(f"{output_dir} already holds checkpoints: pass --resume, or choose a new --output")
    output_dir.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(asdict(config), indent=2))


def _checkpoints(output_dir: Path) -> list[Path]:
    return sorted((output_dir / "checkpoints").glob("step-*"))


def _resume(accelerator: Accelerator, output_dir: Path) -> int:
    found = [path for path in _checkpoints(output_dir) if (path / STATE).is_file()]
    if not found:
        raise FileNotFoundError(f"no finished checkpoint in {output_dir / 'checkpoints'}: run without --resume")
    accelerator.load_state(str(found[-1]))
    step = json.loads((found[-1] / STATE).read_text())["step"]
    logger.info("resumed from %s at step %d", found[-1], step)
    return step


def _save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, keep: int) -> None:
    """The state file is written last: a checkpoint without it is unfinished and never resumed from."""
    path = output_dir / "checkpoints" / f"step-{step:08d}"
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        (path / STATE).write_text(json.dumps({"step": step}))
        for old in _checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def _finish(accelerator, model, config, shards, eval_shards, step, losses) -> dict:
    model = accelerator.unwrap_model(model).indexer
    if is_lora(model):
        model = merge_lora(model)
    output_dir = Path(config.output_dir)
    summary = {
        "backbone": {key: shards.backbone[key] for key in ("name_or_path", "fingerprint", "csa_layers", "index_topk")},
        "data": _describe(shards),
        "eval_data": _describe(eval_shards) if eval_shards else None,
        "hyperparameters": {
            **{key: value for key, value in asdict(config).items() if key not in NOT_HYPERPARAMETERS},
            "layers": [int(layer) for layer in model.config.layers],
        },
        "steps": step,
        "final_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
        "metrics": evaluate(model, eval_shards, config.threshold)
        if eval_shards and accelerator.is_main_process
        else None,
    }
    if accelerator.is_main_process:
        model.save_pretrained(output_dir)
        (output_dir / SUMMARY).write_text(json.dumps(summary, indent=2))
    return summary


def _describe(shards: LabelShards) -> dict:
    manifest = shards.manifest
    return {
        "path": str(shards.directory),
        "documents": len(shards.documents),
        "tokens": sum(document.tokens for document in shards.documents),
        "longest_document": max(document.tokens for document in shards.documents),
        "triggers": shards.num_triggers,
        "labels": manifest["labels"],
        "target_layers": manifest["target_layers"],
        "complete": manifest["complete"],
    }
