"""Training the evaluation backbone on the synthetic tasks, in short resumable runs.

Two losses with disjoint gradients: next-token cross-entropy on the answer tokens trains the model, and the
indexer distillation (distillation.py) trains the Lightning Indexers. For the first `dense_steps` the CSA branch
attends every compressed entry (the warm-up: the model learns to retrieve and the indexers see full attention
distributions); afterwards the indexers' top-k is in force, as when the model is served.

A run is a function of its TrainingConfig: the batch of step s depends only on (seed, step) and the learning
rate only on the step, so resuming from a checkpoint (model and optimizer state) continues the run as if it
had never stopped. A run may start from the weights of an earlier one (`init_from`): a second stage at the
training length, at a lower learning rate and with the hardest tasks drawn more often (`extra_tasks`).
`mix` names the training mix and the task set the run is evaluated on: "ruler" (tasks.py) or "long" (the
long-decoding tasks and question documents of the paper-layout backbone).
"""

import logging
import math
import os
import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import DeepseekV4ForCausalLM

from ..layout import csa_compress_rate
from .backbone import BACKBONE_SIZES, build_eval_backbone, eval_backbone_config
from .batches import IGNORE, MIX_VOCAB_SIZES, MIXES, Batch, curriculum_length, make_batch
from .catalog import TASK_SETS, evaluation_examples
from .compare import evaluate_accuracy
from .distillation import IndexerDistillation, indexer_parameter_names, set_dense_csa
from .restricted_candidates import CandidateDraw, CandidateRestriction
from .tasks import TASK_NAMES

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
MODEL_DIR_NAME = "model"
PRECISIONS = ("bf16", "fp32")


@dataclass(frozen=True)
class TrainingConfig:
    """Everything that decides the trained weights (and nothing else: device, checkpoint cadence and time
    limits are arguments of `train_backbone`, so they can change between a run and its resumption)."""

    size: str = "small"
    seed: int = 0
    steps: int = 3400
    dense_steps: int = 1860
    min_length: int = 64
    max_length: int = 512
    ramp_steps: int = 2500
    tokens_per_step: int = 16384
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.0
    kl_weight: float = 1.0
    grad_clip: float = 1.0
    precision: str = "bf16"
    init_from: str | None = None  # a saved backbone (save_pretrained directory) to start from; None: fresh weights
    extra_tasks: tuple[str, ...] = ()  # evaluation tasks drawn once more per turn of the training mix
    mix: str = "ruler"  # the training mix (batches.MIXES) and the task set it is evaluated on (catalog.TASK_SETS)
    sliding_window: int | None = None  # None: the size's; a later stage may widen it (weights do not depend on it)
    # LSA-restricted training (restricted_candidates.py; departs from the paper): the share of long-task examples
    # whose answers pick only among their evidence, a tail, the sink and a random share of up to
    # restricted_random of the other chunks; 0: off, the batches of a run without it
    restricted_share: float = 0.0
    restricted_random: float = 0.2

    def __post_init__(self):
        object.__setattr__(self, "extra_tasks", tuple(self.extra_tasks))  # a list when read back from a checkpoint
        if self.mix not in MIXES:
            raise ValueError(f"mix must be one of {sorted(MIXES)}, got {self.mix!r}")
        tasks = TASK_SETS[self.mix]
        unknown = [task for task in self.extra_tasks if task not in tasks]
        if unknown:
            raise ValueError(f"extra_tasks must be evaluation tasks ({', '.join(tasks)}), got {unknown}")
        if self.size not in BACKBONE_SIZES:
            raise ValueError(f"size must be one of {sorted(BACKBONE_SIZES)}, got {self.size!r}")
        check_vocabulary(self.size, MIX_VOCAB_SIZES[self.mix], f"the {self.mix!r} mix")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.steps < 1 or not 0 <= self.dense_steps <= self.steps:
            raise ValueError(f"need steps >= 1 and 0 <= dense_steps <= steps, got {self.steps}, {self.dense_steps}")
        if not 0 < self.min_length <= self.max_length:
            raise ValueError(f"need 0 < min_length <= max_length, got {self.min_length}, {self.max_length}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be at least 1 (or None for the size's), got {self.sliding_window}")
        try:
            self.candidate_draw()
        except ValueError as error:
            raise ValueError(
                f"restricted_share {self.restricted_share}, restricted_random {self.restricted_random}: {error}"
            ) from None
        if self.tokens_per_step < self.max_length:
            raise ValueError(f"tokens_per_step ({self.tokens_per_step}) must hold one max_length context")

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to a tenth of `lr` at the last step."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))

    def batch_for(self, step: int) -> Batch:
        length = curriculum_length(self.seed, step, self.min_length, self.max_length, self.ramp_steps)
        mix = MIXES[self.mix] + tuple((task, {}) for task in self.extra_tasks)
        return make_batch(self.seed, step, length, max(1, self.tokens_per_step // length), mix, self.candidate_draw())

    def candidate_draw(self) -> CandidateDraw | None:
        """The LSA restriction the batches are drawn with; None when restricted_share is 0."""
        rate = csa_compress_rate(eval_backbone_config(self.size))
        draw = CandidateDraw(self.restricted_share, self.restricted_random, rate)
        return draw if self.restricted_share > 0 else None


def check_vocabulary(size: str, needed: int, user: str) -> None:
    """Refuse a backbone size with fewer than `needed` token ids; `user` names what needs them in the message."""
    vocab_size = eval_backbone_config(size).vocab_size
    if vocab_size < needed:
        fits = sorted(other for other in BACKBONE_SIZES if eval_backbone_config(other).vocab_size >= needed)
        raise ValueError(
            f"{user} needs ids up to {needed - 1}, beyond the {vocab_size}-token vocabulary of size {size!r}; "
            f"use a size of {fits}"
        )


def initial_model(config: TrainingConfig) -> torch.nn.Module:
    """The model step 0 starts from: fresh weights of `config.size` (seeded), or those saved in `init_from`,
    loaded into that architecture in fp32 (so a bf16 export can start a run); `config.sliding_window`, when set,
    replaces the size's window (the saved backbone's config carries it on)."""
    window = {} if config.sliding_window is None else {"sliding_window": config.sliding_window}
    backbone = eval_backbone_config(config.size, **window)
    model = build_eval_backbone(backbone, seed=config.seed)
    if config.init_from is None:
        if config.min_length > backbone.sliding_window:
            logger.warning(
                "fresh weights and contexts from %d tokens, beyond the %d-token sliding window: on an H200 such "
                "a curriculum never left the loss plateau (docs/evaluation.md); start inside the window "
                "(--min-length %d, e.g. --mix recall) and continue from those weights with --init-from",
                config.min_length, backbone.sliding_window, backbone.sliding_window,
            )
        return model
    if not (Path(config.init_from) / "config.json").is_file():
        raise FileNotFoundError(f"init_from {config.init_from!r} is not a saved backbone (no config.json in it)")
    saved = DeepseekV4ForCausalLM.from_pretrained(config.init_from, dtype=torch.float32)
    if saved.config.tie_word_embeddings != backbone.tie_word_embeddings:  # loading would keep one of the two
        tied = {True: "tied", False: "untied"}
        raise ValueError(
            f"init_from {config.init_from!r} has {tied[saved.config.tie_word_embeddings]} embeddings, size "
            f"{config.size!r} {tied[backbone.tie_word_embeddings]} ones (the paper size is tied since the fourth "
            "backbone run, docs/evaluation.md): train from fresh weights"
        )
    try:
        model.load_state_dict(saved.state_dict(), strict=True)
    except RuntimeError as error:
        raise ValueError(
            f"init_from {config.init_from!r} is not a {config.size!r} evaluation backbone: {error}"
        ) from None
    return model


def autocast(device: torch.device, precision: str):
    """bf16 autocast over fp32 master weights; fp32 runs as is."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def make_optimizer(model, config: TrainingConfig) -> torch.optim.AdamW:
    """AdamW, decaying matrices only. Each parameter group names its clip set ("main" or "indexer"): the two
    sets' gradients come from different losses, so their norms are clipped separately and never rescale
    each other."""
    indexer_names = indexer_parameter_names(model)
    groups: dict[tuple[str, bool], list] = {(s, d): [] for s in ("main", "indexer") for d in (False, True)}
    for name, param in model.named_parameters():
        groups[("indexer" if name in indexer_names else "main", param.ndim >= 2)].append(param)
    return torch.optim.AdamW(
        [
            {"params": params, "weight_decay": config.weight_decay if decay else 0.0, "clip_set": clip_set}
            for (clip_set, decay), params in groups.items()
        ],
        lr=config.lr,
        betas=(0.9, 0.95),
    )


def _clip_gradients(optimizer: torch.optim.Optimizer, max_norm: float) -> None:
    for clip_set in ("main", "indexer"):
        params = [p for group in optimizer.param_groups if group["clip_set"] == clip_set for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, max_norm)


def answer_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over answer tokens, and the fraction of them predicted right (argmax).
    Computed over every position with IGNORE masking rather than by selecting answer positions: selecting
    them would make the GPU wait for the host."""
    logits, targets = logits.flatten(0, 1).float(), targets.flatten()
    loss = F.cross_entropy(logits, targets, ignore_index=IGNORE)
    answered = targets != IGNORE
    right = (logits.argmax(dim=-1) == targets) & answered
    return loss, right.sum() / answered.sum().clamp_min(1)


def _save_checkpoint(path: Path, step: int, config: TrainingConfig, model, optimizer) -> None:
    """Written to a temporary file and renamed: an interrupted save never leaves a broken checkpoint."""
    state = {"step": step, "config": asdict(config), "model": model.state_dict(), "optimizer": optimizer.state_dict()}
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def _load_checkpoint(path: Path, config: TrainingConfig, model, optimizer) -> int:
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = TrainingConfig(**state["config"])
    if saved != config:
        changed = {k: (v, getattr(config, k)) for k, v in asdict(saved).items() if v != getattr(config, k)}
        raise ValueError(
            f"{path} was made with other settings {changed} (checkpoint, now): pass the same flags to resume, "
            f"or start a new run in another output directory"
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return state["step"]


def _start_step(path: Path, resume: bool, config: TrainingConfig, model, optimizer) -> int:
    if path.exists() and not resume:
        raise FileExistsError(f"{path} exists: pass --resume to continue that run, or use another output directory")
    if resume and path.exists():
        step = _load_checkpoint(path, config, model, optimizer)
        logger.info("resuming from %s at step %d of %d", path, step, config.steps)
        return step
    if resume:
        logger.info("no checkpoint in %s: starting a new run", path.parent)
    return 0


@dataclass
class TrainingRun:
    """What `train_backbone` did: the model (sparse CSA, ready to serve), whether the run reached its last step
    (False when `max_minutes` stopped it first, with a checkpoint that `resume=True` continues from), and the
    metrics of every step this call ran."""

    model: torch.nn.Module
    finished: bool
    history: list[dict] = field(default_factory=list)


def train_backbone(
    config: TrainingConfig,
    output_dir: str | Path,
    device: str | torch.device = "cpu",
    resume: bool = False,
    checkpoint_every: int = 200,
    max_minutes: float | None = None,
    log_every: int = 50,
    progress: bool = True,
    compile: bool = False,
) -> TrainingRun:
    """Train (or continue) the run in `output_dir`; a finished run also saves the model (save_pretrained).

    compile: run the forward and backward through torch.compile (dynamic shapes: the curriculum changes the
    context length). The step is launch-bound at these sizes, and compiling fuses its thousands of small
    operators; the weights are those of an eager run up to float rounding (on the CPU, at paper-smoke sizes: the
    same losses, gradients within 1e-4 relative). Compiling takes minutes per context shape and phase (the
    dense phase and the sparse phase are two graphs); an execution setting like the device, so not part of
    TrainingConfig, and a run may resume with or without it."""
    device = torch.device(device)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = output_dir / CHECKPOINT_NAME
    model = initial_model(config).to(device)
    optimizer = make_optimizer(model, config)
    step = _start_step(checkpoint, resume, config, model, optimizer)
    stepped = _compiled(model) if compile else model
    deadline = None if max_minutes is None else time.monotonic() + 60 * max_minutes
    run = TrainingRun(model, finished=False)
    model.train()
    with CandidateRestriction(model) as restriction, IndexerDistillation(model) as distillation:
        bar = tqdm(total=config.steps, initial=step, desc="train backbone", disable=not progress)
        while step < config.steps:
            metrics = train_step(stepped, distillation, optimizer, config, step, device, restriction)
            run.history.append(metrics)
            step += 1
            shown = {k: f"{v:.3f}" if isinstance(v, float) else v for k, v in metrics.items()}
            bar.update()
            bar.set_postfix(shown)
            if step % log_every == 0 or step == config.steps:
                bar.write(", ".join(f"{k} {v}" for k, v in shown.items()))
            if step % checkpoint_every == 0 or step == config.steps:
                _save_checkpoint(checkpoint, step, config, model, optimizer)
            if deadline is not None and time.monotonic() > deadline and step < config.steps:
                _save_checkpoint(checkpoint, step, config, model, optimizer)
                logger.warning("stopped by max_minutes at step %d of %d; rerun with --resume", step, config.steps)
                break
        bar.close()
    set_dense_csa(model, False)
    run.finished = step >= config.steps
    if run.finished:
        model.save_pretrained(output_dir / MODEL_DIR_NAME)
    return run


def time_steps(config: TrainingConfig, device: str | torch.device, steps: int = 8, compile: bool = False) -> dict:
    """Seconds a step of `config` takes at its longest context, dense and sparse CSA, and the peak device bytes:
    what a run will cost, measured before it is started (the step is launch-bound on a GPU at these sizes, so
    its time hardly follows the tokens: time a few --tokens-per-step before choosing). One warm-up step a phase
    is left out (with compile, that step compiles the phase's graph); nothing is saved. The projection counts
    every step at the longest context, an upper bound."""
    device = torch.device(device)
    timed = replace(config, min_length=config.max_length, ramp_steps=0)
    model = initial_model(timed).to(device)
    optimizer = make_optimizer(model, timed)
    stepped = _compiled(model) if compile else model
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    phases = {"dense": config.dense_steps > 0, "sparse": config.dense_steps < config.steps}
    seconds = {}
    with CandidateRestriction(model) as restriction, IndexerDistillation(model) as distillation:
        for phase in [phase for phase, runs in phases.items() if runs]:
            phase_config = replace(timed, dense_steps=timed.steps if phase == "dense" else 0)
            durations = []
            for step in range(steps + 1):
                _synchronize(device)
                start = time.perf_counter()
                train_step(stepped, distillation, optimizer, phase_config, step % timed.steps, device, restriction)
                _synchronize(device)
                durations.append(time.perf_counter() - start)
            seconds[phase] = statistics.median(durations[1:])
    set_dense_csa(model, False)
    dense_steps, sparse_steps = config.dense_steps, config.steps - config.dense_steps
    projected = dense_steps * seconds.get("dense", 0.0) + sparse_steps * seconds.get("sparse", 0.0)
    return {
        "tokens_per_step": config.tokens_per_step,
        "context": config.max_length,
        "dense_s": seconds.get("dense"),
        "sparse_s": seconds.get("sparse"),
        "peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "projected_minutes": projected / 60,
    }


def _compiled(model: torch.nn.Module) -> torch.nn.Module:
    """The step's forward and backward through torch.compile; dynamic shapes, since the curriculum changes the
    context length and with it the batch size."""
    return torch.compile(model, dynamic=True)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(
    model,
    distillation: IndexerDistillation,
    optimizer,
    config: TrainingConfig,
    step: int,
    device,
    restriction: CandidateRestriction | None = None,
) -> dict:
    """One optimizer step on the batch of `step`; returns its metrics. `restriction` (hooked on the model) is
    needed when the config restricts candidates."""
    dense = step < config.dense_steps
    set_dense_csa(model, dense)
    batch = config.batch_for(step).to(device)
    for group in optimizer.param_groups:
        group["lr"] = config.lr_at(step)
    distillation.rows = batch.distill_rows
    if restriction is not None:
        restriction.use(batch.candidate_chunks, batch.restricted_from, batch.input_ids.shape[1])
    elif batch.candidate_chunks is not None:
        raise ValueError("the config restricts candidates: pass train_step a CandidateRestriction hooked on the model")
    with autocast(device, config.precision):
        logits = model(input_ids=batch.input_ids, use_cache=False).logits
    lm_loss, token_accuracy = answer_loss(logits, batch.targets)
    kl = distillation.loss()
    (lm_loss + config.kl_weight * kl).backward()
    _clip_gradients(optimizer, config.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {
        "step": step + 1,
        "phase": "dense" if dense else "sparse",
        "context": batch.context_length,
        "batch": batch.input_ids.shape[0],
        "loss": lm_loss.item(),
        "kl": kl.item(),
        "answer_token_acc": token_accuracy.item(),
    }


def evaluate_backbone(
    model,
    lengths: list[int],
    examples_per_task: int,
    seed: int = 0,
    precision: str = "fp32",
    tokens_per_batch: int = 32768,
    progress: bool = True,
    dense_csa: bool = False,
    tasks: tuple[str, ...] = TASK_NAMES,
    answer_tokens: int | None = None,
) -> dict[int, dict[str, float]]:
    """Per-length, per-task exact-match accuracy with the stock full cache.

    dense_csa=False is the model as served (each CSA query sees its native indexer's top-k); True lets every
    query see all compressed entries. The gap between the two is what the native indexer's choice costs.
    answer_tokens sizes the long tasks' answers (catalog.evaluation_examples).
    """
    device = next(model.parameters()).device
    set_dense_csa(model, dense_csa)
    model.eval()
    results = {}
    try:
        for length in lengths:
            examples = [ex for task in tasks for ex in evaluation_examples(task, length, examples_per_task, seed, answer_tokens)]
            with autocast(device, precision):
                batch_size = max(1, tokens_per_batch // length)
                results[length] = evaluate_accuracy(model, examples, batch_size=batch_size, progress=progress)
    finally:
        set_dense_csa(model, False)
    return results
