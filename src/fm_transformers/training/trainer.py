"""Backbone-free training of a memory indexer from label shards, with accelerate.

Only the memory indexer exists in this process: its key side (the native indexer keys) and its inputs (hidden
states) were stored by the dump, and the backbone is known only by the dimensions in the manifest. The same
command runs on the CPU, one GPU, or several (`accelerate launch`). Batches are made on the device from parts
staged ahead, on a thread of their own (device_batches.py, producer.py), and the loop never waits on the host:
losses are fetched every `log_every` steps, not every step. Checkpoints hold the model, optimizer, scheduler and
RNG states plus the step, and the data order and negative draws are functions of (seed, epoch, batch), so a
resumed run ends with the weights of an uninterrupted one.
"""

import json
import logging
import shutil
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from ..indexer import MemoryIndexerModel
from .dataset import host_batches
from .device_batches import block_batches, device_batches
from .evaluate import evaluate
from .lora import add_lora, is_lora, merge_lora
from .losses import LOSSES
from .order import EpochOrder
from .read_groups import ReadGroups
from .shards import LabelShards, backbone_config
from .step import IndexerLoss, TriggerBatch

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
    "loader",
    "compile",
    "prefetch",
    "log_every",
)
# The loaders that make batches on the device: on a producer thread, or on the training thread (same batches)
DEVICE_LOADERS = {"device": device_batches, "device-inline": block_batches}
LOADERS = (*DEVICE_LOADERS, "host")
# Settings that fix the shape of the model and the data order: a resume with other values cannot continue.
RESUME_FIXED = ("data", "layers", "num_heads", "rank", "init_from", "lora_r", "batch_size", "seed")
# (epoch, first batch) -> a generator of that epoch's batches from the first on, on the training device
BatchSource = Callable[[int, int], Iterator[TriggerBatch]]


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
    loader: str = "device"  # "device-inline": the same batches made on the training thread; "host": the
    # per-sample CPU reference (dataset.py), for comparison
    num_workers: int = 0  # DataLoader worker processes of the host loader
    prefetch: int = 2  # parts staged on the device ahead of the one in use
    compile: bool = False  # torch.compile the step's forward and backward (query towers, scoring, loss)
    log_every: int = 50  # steps between loss reads (each waits for the device)

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}: choose one of {LOSSES}")
        if self.loader not in LOADERS:
            raise ValueError(f"unknown loader {self.loader!r}: choose one of {LOADERS}")
        if self.negative_ratio < 0:
            raise ValueError(f"negative_ratio must be >= 0, got {self.negative_ratio}")
        if self.prefetch < 1 or self.log_every < 1:
            raise ValueError(f"prefetch and log_every must be positive, got {self.prefetch} and {self.log_every}")
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


@dataclass
class _Run:
    """Everything a training loop touches, prepared by accelerate."""

    model: IndexerLoss
    optimizer: torch.optim.Optimizer
    scheduler: object
    shards: LabelShards
    groups: ReadGroups  # what the loaders read: the parts in groups of at least a batch of trigger steps
    layers: list[int]
    steps_per_epoch: int  # optimizer steps of this process
    total_steps: int


def train(config: TrainConfig, batch_source: BatchSource | None = None) -> dict:
    """Train, save the indexer with save_pretrained in output_dir, evaluate; returns the run summary.

    batch_source: batches made elsewhere in place of the loader's, for measurements (the throughput benchmark
    feeds batches made before the run to time the step without its loader). It is an argument and not a
    TrainConfig field because the config is saved as JSON and describes a reproducible run, which a run fed
    so is not. The data shards still set the model's shape and the number of steps in an epoch."""
    output_dir = Path(config.output_dir)
    shards = LabelShards(config.data)
    eval_shards = LabelShards(config.eval_data) if config.eval_data else None
    if eval_shards is not None:
        shards.check_same_backbone(eval_shards)
    _prepare_output(output_dir, config)
    accelerator = Accelerator(mixed_precision="bf16" if config.bf16 else "no", cpu=config.cpu)
    set_seed(config.seed)
    run = _setup(accelerator, config, shards)
    first_step = _resume(accelerator, output_dir) if config.resume else 0
    source = batch_source or partial(_batches, accelerator, run, config)
    step, losses = _loop(accelerator, run, config, first_step, source)
    if not (config.save_every and step % config.save_every == 0):
        _save_checkpoint(accelerator, output_dir, step, config.keep_checkpoints)
    return _finish(accelerator, run.model, config, shards, eval_shards, first_step, step, losses)


def _setup(accelerator: Accelerator, config: TrainConfig, shards: LabelShards) -> _Run:
    model = build_indexer(config, shards)
    model.config.tau = shards.manifest["labels"].get("tau")  # checked against LSAConfig.tau when it is used
    layers = [int(layer) for layer in model.config.layers]
    missing = [layer for layer in layers if layer not in shards.target_layers]
    if missing:
        raise ValueError(
            f"layers {missing} were not dumped in {shards.directory} (it has {shards.target_layers}): "
            f"train on dumped layers or dump labels for these"
        )
    if config.lora_r is not None:
        model = add_lora(model, config.lora_r, config.lora_alpha)
    model.to(accelerator.device)  # before the optimizer: the fused AdamW wants its parameters where they train
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    fused = True if accelerator.device.type == "cuda" else None
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay, fused=fused)
    dtype = torch.bfloat16 if config.bf16 else torch.float32
    loss = IndexerLoss(model, layers, config.loss, config.gamma, dtype, config.compile)
    loss, optimizer = accelerator.prepare(loss, optimizer)
    groups = ReadGroups(shards, min_triggers=config.batch_size)
    order = EpochOrder(groups.part_triggers(), config.batch_size, config.seed, 0, *_rank(accelerator))
    if len(order) == 0:
        raise ValueError(
            f"{shards.directory} has {shards.num_triggers} trigger steps: fewer than one batch of {config.batch_size} "
            f"for each of {accelerator.num_processes} processes; lower --batch-size or use more documents"
        )
    total_steps = config.max_steps or config.epochs * len(order)
    # accelerate steps a prepared scheduler once per process at every optimizer step
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, config.warmup_steps * accelerator.num_processes, total_steps * accelerator.num_processes
    )
    scheduler = accelerator.prepare(scheduler)
    logger.info("training %d parameters on %d trigger steps", sum(p.numel() for p in trainable), shards.num_triggers)
    return _Run(loss, optimizer, scheduler, shards, groups, layers, len(order), total_steps)


def _rank(accelerator: Accelerator) -> tuple[int, int]:
    return accelerator.process_index, accelerator.num_processes


class _LossHistory:
    """Step losses, read from the device every few steps: a read every step would make the host wait for each
    step, and the device for the host's next launches."""

    def __init__(self):
        self.values: list[float] = []
        self._pending: list[torch.Tensor] = []

    def add(self, loss: torch.Tensor) -> None:
        self._pending.append(loss.detach())

    def flush(self) -> float | None:
        if self._pending:
            self.values += torch.stack(self._pending).float().cpu().tolist()
            self._pending = []
        return self.values[-1] if self.values else None


def _loop(
    accelerator: Accelerator, run: _Run, config: TrainConfig, step: int, source: BatchSource
) -> tuple[int, list[float]]:
    """Optimizer steps from `step` to run.total_steps; epochs and the position inside one follow from the step."""
    history = _LossHistory()
    output_dir = Path(config.output_dir)
    with tqdm(total=run.total_steps, initial=step, desc="train", disable=not accelerator.is_main_process) as bar:
        while step < run.total_steps:
            epoch, done_in_epoch = divmod(step, run.steps_per_epoch)
            with closing(source(epoch, done_in_epoch)) as batches:
                for batch in batches:
                    loss = run.model(batch)
                    accelerator.backward(loss)
                    run.optimizer.step()
                    run.scheduler.step()
                    run.optimizer.zero_grad()
                    step += 1
                    history.add(loss)
                    bar.update(1)
                    if step % config.log_every == 0:
                        bar.set_postfix(loss=f"{history.flush():.4f}")
                    if config.save_every and step % config.save_every == 0:
                        _save_checkpoint(accelerator, output_dir, step, config.keep_checkpoints)
                    if step >= run.total_steps:
                        break
    history.flush()
    return step, history.values


def _batches(accelerator, run: _Run, config: TrainConfig, epoch: int, start: int) -> Iterator[TriggerBatch]:
    """This process's batches of `epoch` from batch `start` on, on the training device."""
    order = EpochOrder(run.groups.part_triggers(), config.batch_size, config.seed, epoch, *_rank(accelerator))
    if config.loader in DEVICE_LOADERS:
        yield from DEVICE_LOADERS[config.loader](
            run.groups, run.layers, order, start, config.negative_ratio, accelerator.device, config.prefetch
        )
        return
    for batch in host_batches(run.groups, run.layers, order, start, config.negative_ratio, config.num_workers):
        yield batch.to(accelerator.device)


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


def _finish(accelerator, model, config, shards, eval_shards, first_step, step, losses) -> dict:
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
        "final_loss": _mean(losses[-10:]) if losses else None,
        "loss_curve": _curve(losses, first_step, config.log_every),
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


def _curve(losses: list[float], first_step: int, every: int) -> list[list[float]]:
    """[last step, mean loss] over each run of `every` steps of this run (a resumed run: from where it resumed)."""
    starts = range(0, len(losses), every)
    return [[first_step + min(start + every, len(losses)), _mean(losses[start : start + every])] for start in starts]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
