"""Memory-indexer training throughput at DeepSeek-V4-Flash sizes: the host loader against the device loader.

    python examples/benchmarks/indexer_training_throughput.py --output indexer_training_throughput.json
    python examples/benchmarks/indexer_training_throughput.py --small --output small.json   # CPU, tiny sizes
    accelerate launch --num_processes 2 examples/benchmarks/indexer_training_throughput.py --output two_gpus.json

The trainer never sees the backbone, only label shards, so its speed depends on the shapes in the shards and not
on their values. The script writes synthetic shards with the dump's own writer (shard_writer.ShardWriter; the
manifest laid out as dump.py lays it out, the fingerprint from shards.backbone_identity over a random stand-in for
the weight the dump hashes) for a backbone shaped like DeepSeek-V4-Flash: hidden 4096, index keys of 128, 43
layers (0-1 sliding, then CSA on even and HCA on odd layers), target layers 22, 26, 42 (the paper's CSA ordinals
10, 12, 20). Per document of N tokens: a trigger every tau = 64 tokens from the sliding window on, hidden states
(triggers, 4096) and frozen keys (N / 4, 128) per target layer in bf16, 100-1000 golden positives per trigger
(never more than the chunks that exist at it) and 512-2048 chunks the native top-k picked.

Then it runs the real trainer (trainer.train, what `fm-indexer train` calls) with a release-size indexer (128
heads, rank 2048), bf16 mixed precision, once per --runs entry on the same data: `host` (the per-sample CPU
loader, the trainer as it was), `device` (batches made on the GPU from staged parts, on a producer thread),
`device-compiled` (the same with torch.compile of the step's forward and backward: query towers, scoring and
loss), and on request `device-inline` and `device-inline-compiled` (the same batches made on the training thread).
`--switch-interval` sets the interpreter's thread switch interval for the whole run. A *sample* is one
trigger step: one (document, trigger) pair, scored by every target layer against its positives and 3x as many
sampled negatives; an optimizer step takes --batch-size samples. Global optimizer hooks mark the steps, so the
trainer runs unchanged, and the device is synchronized only at the edges of each window (and at the trainer's
loss reads, every 20 steps):
- warm-up (--warmup steps, untimed; torch.compile compiles here);
- timed (--steps): samples/s (of all processes together), and at its end the peak GPU memory
  (torch.cuda.max_memory_allocated) and the NVML utilization (torch.cuda.utilization, the share of the last
  sample period with a kernel running) if pynvml is installed;
- profiled (--profile-steps under torch.profiler, after one untimed step in which it starts up): GPU kernel time
  per step (copies and memsets left out); GPU utilisation = that over the wall time per step of the timed window;
- FLOPs (--flop-steps, under torch.utils.flop_counter.FlopCounterMode, eager runs only): matmul FLOPs per step,
  forward and backward. The floor is those FLOPs at --peak-tflops (H200 dense bf16: 989 TFLOP/s).
Two loader shares. *Loader alone*: the loader by itself (same shards, order and batch size; for `host` including
the copy of each batch to the device), timed with a synchronization at its end, over the wall time per step of the
run; it overstates what the loader costs training when its work overlaps the step (the device loader stages parts
and makes batches on threads of its own, on side streams). *Loader exposed*: what the loader adds to a step, 1 -
(wall time per step fed pre-made batches) / (wall time per step of the run). For it each run is repeated as it was
(same shards, batch size, compile flag, warm-up and timed steps; no profiled or FLOP window) but fed through
trainer.train's batch_source by a ring of --ring-batches batches made by the run's own loader before it starts and
held on the device, cycled, so the loader costs nothing while it is timed. A ring, not every batch of the window:
at release sizes a batch holds about 200 MB of candidate keys. The ring's batches are the loader's own (finished,
as the step gets them), from the start of the epoch; their candidate widths follow the same distribution as the
window's. The loader alone is probed on the training documents and on documents of 128K and 512K tokens; the
estimate for the paper's data (10,000 documents of 16K-512K tokens, log-uniform, tokens / 64 trigger steps each,
one epoch, 22.9M trigger steps) adds, per document length, the loader's extra cost over the training documents to
the measured time per sample. Each run's loss curve (the trainer's, every 20 steps) is printed and kept. A run that
fails (say, torch.compile on this machine) is reported with its error and the others still run.

--profile-loader N: torch.profiler (CPU, and CUDA on a GPU) over N batches of each loader alone on the training
documents (across epochs where one has fewer batches), after one batch that is left out: the 15 ops with the most
self CPU time and the 15 with the most CUDA time, the loader's own ranges ("loader: ..."), the self CPU time on the
main thread (what competes with the step's launches; not the time it waits for the device loader's producer thread,
"loader: wait for the producer") and on the others (part staging, batch making), and the main thread's wall time
inside next() per batch, measured without the profiler (waiting included). Prints a table last; writes JSON to
--output (on the main process).
"""

import argparse
import gc
import itertools
import json
import shutil
import sys
import tempfile
import time
import traceback
from contextlib import closing
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.profiler import ProfilerActivity, _ExperimentalConfig, profile, record_function, schedule
from torch.utils.flop_counter import FlopCounterMode
from transformers import DeepseekV4Config

from fm_transformers.indexer import default_target_layers
from fm_transformers.training import DumpConfig, LabelShards, TrainConfig, train
from fm_transformers.training.dataset import host_batches
from fm_transformers.training.labels import effective_vote, trigger_positions, visible_chunks
from fm_transformers.training.order import EpochOrder
from fm_transformers.training.producer import WAIT_RANGE
from fm_transformers.training.read_groups import ReadGroups
from fm_transformers.training.shard_writer import ShardWriter
from fm_transformers.training.shards import FORMAT, MANIFEST, VERSION, atomic_write_json, backbone_identity
from fm_transformers.training.step import TriggerBatch
from fm_transformers.training.trainer import DEVICE_LOADERS, BatchSource

SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
# The paper trains its indexer on this set in about one GPU-hour.
PAPER = {"documents": 10_000, "min_tokens": 16_384, "max_tokens": 524_288, "gpu_hours": 1.0}
FULL = {"hidden": 4096, "index_head_dim": 128, "tokens": 16_384, "positives": (100, 1000), "probe": (131_072, 524_288)}
SMALL = {"hidden": 64, "index_head_dim": 16, "tokens": 1024, "positives": (4, 40), "probe": (2048, 4096)}
RUNS = {
    "host": ("host", False),
    "device": ("device", False),
    "device-compiled": ("device", True),
    "device-inline": ("device-inline", False),
    "device-inline-compiled": ("device-inline", True),
}
LOG_EVERY = 20  # each loss read waits for the device: one a step would serialize host and device
TOP_OPS = 15
NEXT_BATCH = "benchmark: next batch"  # the profiler range around each next() of a profiled loader


def flash_backbone(small: bool) -> DeepseekV4Config:
    """V4-Flash's layer layout; the other fields keep DeepseekV4Config's defaults, which have V4-Flash's sizes."""
    sizes = SMALL if small else FULL
    layer_types = [SLIDING, SLIDING] + [CSA if layer % 2 == 0 else HCA for layer in range(2, 43)]
    return DeepseekV4Config(
        hidden_size=sizes["hidden"],
        head_dim=64 if small else 512,  # the compress rotary spans head_dim / 8 of the index key
        index_head_dim=sizes["index_head_dim"],
        num_hidden_layers=len(layer_types),
        layer_types=layer_types,
    )


def stand_in_identity(config: DeepseekV4Config, generator: torch.Generator) -> dict:
    """backbone_identity of a "model" that has only what it reads: the config and a random first indexer weight."""
    weight = torch.randn(config.index_head_dim, config.hidden_size, generator=generator)
    indexer = SimpleNamespace(kv_proj=SimpleNamespace(weight=weight))
    layer = SimpleNamespace(self_attn=SimpleNamespace(compressor=SimpleNamespace(indexer=indexer)))
    model = SimpleNamespace(config=config, model=SimpleNamespace(layers=[layer] * config.num_hidden_layers))
    return backbone_identity(model, "synthetic DeepSeek-V4-Flash (random label shards)")


def chunk_sets(rng: np.random.Generator, visible: torch.Tensor, low: int, high: int):
    """CSR (indptr, indices) of low..high distinct chunks per trigger (fewer if fewer exist), ascending."""
    rows = [np.zeros(0, dtype=np.int64)]
    for limit in visible.tolist():
        count = min(limit, int(rng.integers(low, high + 1)))
        rows.append(np.sort(rng.choice(limit, size=count, replace=False)))
    indptr = torch.cumsum(torch.tensor([row.size for row in rows]), 0)
    return indptr, torch.from_numpy(np.concatenate(rows)).long()


def synthetic_document(tokens: int, manifest: dict, config: DeepseekV4Config, sizes: dict, seed: int) -> dict:
    """The tensors the dump stores for one document (names as in shards.py), random at the dump's shapes."""
    labels, rate = manifest["labels"], manifest["backbone"]["compress_rate"]
    generator, rng = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
    positions = trigger_positions(tokens, labels["warmup"], labels["tau"])
    visible = visible_chunks(positions, rate)
    label_indptr, label_indices = chunk_sets(rng, visible, *sizes["positives"])
    used_indptr, used_indices = chunk_sets(rng, visible, config.index_topk, 4 * config.index_topk)
    picks_per_window = labels["tau"] * len(manifest["backbone"]["csa_layers"])  # (token, CSA layer) pairs
    tensors = {
        "positions": positions,
        "labels/indptr": label_indptr,
        "labels/indices": label_indices,
        "used/indptr": used_indptr,
        "used/indices": used_indices,
        "used/counts": torch.randint(1, picks_per_window + 1, used_indices.shape, generator=generator),
    }
    for layer in manifest["target_layers"]:
        shape = (positions.numel(), config.hidden_size)
        tensors[f"hidden/{layer}"] = torch.randn(shape, generator=generator, dtype=torch.bfloat16)
        keys = (tokens // rate, config.index_head_dim)
        tensors[f"keys/{layer}"] = torch.randn(keys, generator=generator, dtype=torch.bfloat16)
    return tensors


def write_label_set(
    directory: Path, lengths: list[int], config: DeepseekV4Config, identity: dict, sizes: dict, seed: int
) -> None:
    """A complete label directory as dump.dump_labels writes it (bounded shards, long documents in parts)."""
    dump = DumpConfig(target_layers=tuple(default_target_layers(config)))
    doc_ids = [f"synthetic-{seed}-{index:05d}" for index in range(len(lengths))]
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "backbone": identity,
        "target_layers": sorted(dump.target_layers),
        "labels": {
            **asdict(dump.labels),
            "warmup": dump.labels.resolved_warmup(identity["sliding_window"]),
            "vote_applied": effective_vote(dump.labels.vote, len(identity["csa_layers"])),
        },
        "chunk_size": dump.chunk_size,
        "docs_per_shard": dump.docs_per_shard,
        "shard_bytes": dump.shard_bytes,
        "documents": doc_ids,
        "shards": [],
        "complete": False,
    }
    directory.mkdir(parents=True)
    writer = ShardWriter(directory, manifest, dump.shard_bytes, dump.docs_per_shard)
    for index, (doc_id, tokens) in enumerate(zip(doc_ids, lengths, strict=True)):
        writer.add(doc_id, tokens, synthetic_document(tokens, manifest, config, sizes, seed * 100_003 + index))
    writer.close()
    manifest["complete"] = True
    atomic_write_json(directory / MANIFEST, manifest)


@dataclass
class Windows:
    """Optimizer steps of each measuring window, in order: warm-up, timed, profiled (after one step in which the
    profiler starts up, outside the timed window), FLOP-counted."""

    warmup: int
    timed: int
    profiled: int
    flops: int

    @property
    def timed_end(self) -> int:
        return self.warmup + self.timed

    @property
    def profiled_end(self) -> int:
        return self.timed_end + (self.profiled + 1 if self.profiled else 0)

    @property
    def total(self) -> int:
        return self.profiled_end + self.flops


@dataclass
class StepProbe:
    """Marks optimizer steps with a global hook and opens and closes the windows' instruments there."""

    windows: Windows
    cuda: bool
    count_flops: bool
    step: int = 0
    marks: dict = field(default_factory=dict)  # window edge -> wall time (synchronized)
    peak_bytes: int | None = None
    nvml_utilization: int | None = None
    flops: float | None = None
    kernel_s: float | None = None

    def __enter__(self):
        self._handle = register_optimizer_step_post_hook(self._tick)
        self._profiler = None
        if self.cuda and self.windows.profiled:
            self._profiler = profile(
                activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                schedule=schedule(wait=self.windows.timed_end, warmup=1, active=self.windows.profiled, repeat=1),
                on_trace_ready=self._read_profile,
            )
            self._profiler.__enter__()
        self._flop_counter = FlopCounterMode(display=False) if self.count_flops and self.windows.flops else None
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
        if self._profiler is not None:
            self._profiler.__exit__(*exc)

    def _tick(self, optimizer, args, kwargs) -> None:
        self.step += 1
        windows = self.windows
        edges = {windows.warmup: "timed_start", windows.timed_end: "timed_end"}
        if self.step in edges:
            self._synchronize()
            self.marks[edges[self.step]] = time.perf_counter()
            if edges[self.step] == "timed_end" and self.cuda:
                self.peak_bytes = torch.cuda.max_memory_allocated()
                self.nvml_utilization = _nvml_utilization()
        if self._profiler is not None:
            self._profiler.step()
        if self._flop_counter is not None and self.step == windows.profiled_end:
            self._flop_counter.__enter__()
        if self._flop_counter is not None and self.step == windows.total:
            self._flop_counter.__exit__(None, None, None)
            self.flops = self._flop_counter.get_total_flops() / windows.flops

    def _synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def _read_profile(self, profiler) -> None:
        kernels = [
            event
            for event in profiler.events()
            if event.device_type == torch.autograd.DeviceType.CUDA and not event.name.startswith(("Memcpy", "Memset"))
        ]
        self.kernel_s = sum(event.time_range.elapsed_us() for event in kernels) / 1e6 / self.windows.profiled


def _nvml_utilization() -> int | None:
    try:
        return torch.cuda.utilization()
    except Exception:  # noqa: BLE001 (no pynvml, or NVML not usable here: pynvml's errors are plain Exceptions)
        return None


def timed_training(
    config: TrainConfig,
    windows: Windows,
    cuda: bool,
    count_flops: bool,
    processes: int,
    batch_source: BatchSource | None = None,
) -> dict:
    """Run trainer.train through every window; rates from the timed window, samples/s of all processes together.
    The peak memory is this process's and the run's own: the peak over what was allocated before it (an earlier
    run's leftovers, if the collector left any)."""
    gc.collect()
    before = 0
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    with StepProbe(windows, cuda, count_flops) as probe:
        summary = train(config, batch_source)
    seconds = probe.marks["timed_end"] - probe.marks["timed_start"]
    step_s = seconds / windows.timed
    return {
        "timed_steps": windows.timed,
        "samples_per_s": windows.timed * config.batch_size * processes / seconds,
        "steps_per_s": windows.timed / seconds,
        "step_ms": step_s * 1e3,
        "kernel_ms_per_step": probe.kernel_s * 1e3 if probe.kernel_s is not None else None,
        "gpu_utilization": min(1.0, probe.kernel_s / step_s) if probe.kernel_s is not None else None,
        "nvml_utilization_percent": probe.nvml_utilization,
        "flops_per_step": probe.flops,
        "peak_gpu_bytes": probe.peak_bytes - before if probe.peak_bytes is not None else None,
        "loss_curve": summary["loss_curve"],
        "train_call_s": time.perf_counter() - start,  # with model setup, compilation and the final checkpoint
    }


def premade_training(
    shards: LabelShards, config: TrainConfig, windows: Windows, cuda: bool, ring: int, state: PartialState
) -> dict:
    """The run again (warm-up and timed window only), fed a ring of `ring` batches its loader made beforehand:
    the wall time per step of the step alone."""
    order = EpochOrder(ReadGroups(shards, config.batch_size).part_triggers(), config.batch_size, config.seed, 0,
                       state.process_index, state.num_processes)
    made = loader_batches(shards, config.loader, config, state.device, state.process_index, state.num_processes)
    batches = list(itertools.islice(made, ring))
    made.close()
    _synchronize(state.device)
    premade = replace(config, output_dir=f"{config.output_dir}-premade", max_steps=windows.total)
    timed = timed_training(premade, windows, cuda, False, state.num_processes, ring_source(batches, len(order)))
    return {"ring_batches": len(batches), **{key: timed[key] for key in ("samples_per_s", "step_ms")}}


def ring_source(ring: list[TriggerBatch], batches_per_epoch: int) -> BatchSource:
    """A trainer batch source that cycles `ring`, an epoch's number of batches at a time."""

    def source(epoch: int, start: int):
        for index in range(epoch * batches_per_epoch + start, (epoch + 1) * batches_per_epoch):
            yield ring[index % len(ring)]

    return source


def loader_batches(shards: LabelShards, loader: str, config: TrainConfig, device, rank: int = 0, world: int = 1):
    """The trainer's loader alone, epoch after epoch from epoch 0 (for `host`: each batch copied to the device), on
    the parts in the trainer's groups."""
    layers, groups = shards.target_layers, ReadGroups(shards, config.batch_size)
    for epoch in itertools.count():
        order = EpochOrder(groups.part_triggers(), config.batch_size, config.seed, epoch, rank, world)
        if loader in DEVICE_LOADERS:
            made = DEVICE_LOADERS[loader](groups, layers, order, 0, config.negative_ratio, device, config.prefetch)
        else:
            made = (batch.to(device) for batch in host_batches(groups, layers, order, 0, config.negative_ratio))
        with closing(made):
            yield from made


def loader_seconds_per_batch(shards: LabelShards, loader: str, config: TrainConfig, batches: int, device) -> float:
    """The trainer's loader alone over the first batches of an epoch; the first batch (it reads the first part) is
    left out."""
    length = len(EpochOrder(ReadGroups(shards, config.batch_size).part_triggers(), config.batch_size, config.seed, 0))
    if length < 2:
        raise ValueError(f"{shards.directory} has a single batch of trigger steps: probe longer documents")
    made = loader_batches(shards, loader, config, device)
    next(made)
    _synchronize(device)
    start, count = time.perf_counter(), min(batches, length - 1)
    for _ in range(count):
        next(made)
    _synchronize(device)
    made.close()
    return (time.perf_counter() - start) / count


def profile_loader(shards: LabelShards, loader: str, config: TrainConfig, batches: int, device) -> dict:
    """Where the loader's time goes, over `batches` batches after a first one left out (see the docstring)."""
    made = loader_batches(shards, loader, config, device)
    next(made)
    _synchronize(device)
    host_s, start = 0.0, time.perf_counter()
    for _ in range(batches):
        asked = time.perf_counter()
        next(made)
        host_s += time.perf_counter() - asked
    _synchronize(device)
    wall_s = time.perf_counter() - start
    made.close()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    made = loader_batches(shards, loader, config, device)
    next(made)
    _synchronize(device)
    # every thread: part staging runs in the loader's own thread, which the profiler leaves out by default
    with profile(activities=activities, experimental_config=_ExperimentalConfig(profile_all_threads=True)) as profiler:
        for _ in range(batches):
            with record_function(NEXT_BATCH):
                next(made)
        _synchronize(device)
    made.close()
    return {
        "batches": batches,
        "host_ms_per_batch": host_s / batches * 1e3,
        "wall_ms_per_batch": wall_s / batches * 1e3,
        **_profile_summary(profiler, batches, device.type == "cuda"),
    }


def _profile_summary(profiler, batches: int, cuda: bool) -> dict:
    """Top ops and the loader's ranges in ms per batch, and the self CPU time on the main thread and the others."""
    cpu_events = [event for event in profiler.events() if event.device_type == torch.autograd.DeviceType.CPU]
    main = {event.thread for event in cpu_events if event.name == NEXT_BATCH}
    on_main = sum(event.self_cpu_time_total for event in cpu_events if event.thread in main)
    waiting = sum(event.self_cpu_time_total for event in cpu_events if event.name == WAIT_RANGE)
    averages = [average for average in profiler.key_averages() if average.key != NEXT_BATCH]

    def row(average) -> dict:
        return {
            "name": average.key,
            "calls_per_batch": average.count / batches,
            "self_cpu_ms_per_batch": average.self_cpu_time_total / batches / 1e3,
            "cpu_ms_per_batch": average.cpu_time_total / batches / 1e3,
            "self_cuda_ms_per_batch": average.self_device_time_total / batches / 1e3,
        }

    def top(key) -> list[dict]:  # the wait is among the ranges, and not an op
        working = [average for average in averages if average.key != WAIT_RANGE]
        return [row(average) for average in sorted(working, key=key, reverse=True)[:TOP_OPS]]

    return {
        "self_cpu_ms_per_batch": {
            "main_thread": (on_main - waiting) / batches / 1e3,  # blocked on the producer's queue: not work
            "other_threads": (sum(event.self_cpu_time_total for event in cpu_events) - on_main) / batches / 1e3,
        },
        "ranges": [row(average) for average in averages if average.key.startswith("loader: ")],
        "top_self_cpu": top(lambda average: average.self_cpu_time_total),
        "top_cuda": top(lambda average: average.self_device_time_total) if cuda else [],
    }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def paper_estimate(seconds_per_sample: float, loader: dict[int, float], tokens: int, tau: int) -> dict:
    """Hours for one epoch over the paper's documents; lengths drawn log-uniform with a fixed seed.

    loader: the loader's seconds per sample at each probed document length."""
    rng = np.random.default_rng(0)
    low, high = np.log(PAPER["min_tokens"]), np.log(PAPER["max_tokens"])
    lengths = np.exp(rng.uniform(low, high, PAPER["documents"]))
    triggers = np.floor(lengths / tau)
    probed = sorted(loader)
    extra = np.interp(lengths, probed, [loader[length] for length in probed]) - loader[tokens]
    return {
        "tokens": float(lengths.sum()),
        "trigger_steps": int(triggers.sum()),
        "hours_at_measured_rate": float(triggers.sum() * seconds_per_sample / 3600),
        "hours_loader_scaled": float((triggers * (seconds_per_sample + extra)).sum() / 3600),
        "samples_per_s_for_paper_hours": float(triggers.sum() / (PAPER["gpu_hours"] * 3600)),
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny sizes and a few steps: runs on a CPU in seconds")
    parser.add_argument("--output", default="indexer_training_throughput.json", help="JSON file for the results")
    parser.add_argument("--runs", default=None, help="comma-separated, of host, device, "
                        "device-compiled, device-inline, device-inline-compiled (default: the first three on a GPU; "
                        "host,device on a CPU)")
    parser.add_argument("--documents", type=int, default=None, help="training documents (default 8; 4 with --small)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens a document (16384; 1024 with --small)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the trainer's 64 (8 with --small)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 20; 2 with --small)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 200; 6 with --small)")
    parser.add_argument("--profile-steps", type=int, default=10, help="steps under torch.profiler (GPU only)")
    parser.add_argument("--flop-steps", type=int, default=2, help="steps under FlopCounterMode (eager runs)")
    parser.add_argument("--probe-batches", type=int, default=8, help="timed loader batches per probed length")
    parser.add_argument("--ring-batches", type=int, default=8, help="pre-made batches cycled by the run that "
                        "times the step without its loader (the exposed loader share)")
    parser.add_argument("--profile-loader", type=int, default=0, metavar="N", help="profile each loader alone "
                        "over N batches: top ops by self CPU and CUDA time, host ms per batch (default: off)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (H200: 989)")
    parser.add_argument("--switch-interval", type=float, default=None, metavar="SECONDS", help="the interpreter's "
                        "thread switch interval (sys.setswitchinterval) for the whole run; default: Python's 0.005")
    parser.add_argument("--data-dir", default=None, help="new directory for shards and indexers (default: temp)")
    args = parser.parse_args()
    small = {"documents": 4, "batch_size": 8, "warmup": 2, "steps": 6}
    full = {"documents": 8, "batch_size": TrainConfig.batch_size, "warmup": 20, "steps": 200}
    for key, value in (small if args.small else full).items():
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    args.tokens = args.tokens or (SMALL if args.small else FULL)["tokens"]
    cuda = torch.cuda.is_available()
    args.runs = (args.runs or ("host,device,device-compiled" if cuda else "host,device")).split(",")
    unknown = [run for run in args.runs if run not in RUNS]
    if unknown:
        parser.error(f"unknown --runs {unknown}: choose among {list(RUNS)}")
    if args.ring_batches < 1 or args.profile_loader < 0:
        parser.error("--ring-batches must be positive and --profile-loader at least 0")
    if not cuda and not args.small:
        parser.error("the full-size benchmark needs a CUDA GPU: run with --small for a CPU smoke test")
    if args.data_dir and Path(args.data_dir).exists() and any(Path(args.data_dir).iterdir()):
        parser.error(f"{args.data_dir} is not empty: pass a new or empty --data-dir")
    return args


def main() -> None:
    args = parse_args()
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    state = PartialState()
    workdir = [args.data_dir or (tempfile.mkdtemp(prefix="indexer-throughput-") if state.is_main_process else None)]
    broadcast_object_list(workdir)  # every process trains on the shards the main process writes
    try:
        run(args, state, Path(workdir[0]))
    finally:
        state.wait_for_everyone()
        if args.data_dir is None and state.is_main_process:
            shutil.rmtree(workdir[0], ignore_errors=True)  # gigabytes of shards and checkpoints at full size


def run(args, state: PartialState, workdir: Path) -> None:
    """Shards, the loader probes, one training per --runs entry, the estimate; table and JSON on the main process."""
    sizes = SMALL if args.small else FULL
    backbone = flash_backbone(args.small)
    cuda = torch.cuda.is_available()
    start = time.perf_counter()
    probes = {f"probe-{length}": [length] for length in sizes["probe"] if length != args.tokens}
    lengths = {"train": [args.tokens] * args.documents, **probes}
    if state.is_main_process:
        identity = stand_in_identity(backbone, torch.Generator().manual_seed(0))
        for seed, (name, documents) in enumerate(lengths.items()):
            write_label_set(workdir / name, documents, backbone, identity, sizes, seed)
    state.wait_for_everyone()
    shards = {name: LabelShards(workdir / name) for name in lengths}
    generation_s = time.perf_counter() - start
    base = TrainConfig(
        data=str(shards["train"].directory),
        output_dir="",
        batch_size=args.batch_size,
        bf16=True,
        cpu=not cuda,
        log_every=LOG_EVERY,
        **({"num_heads": 4, "rank": 32} if args.small else {}),
    )
    windows = Windows(args.warmup, args.steps, args.profile_steps if cuda else 0, args.flop_steps)
    probed = {length: shards[name] for name, documents in lengths.items() for length in documents[:1]}
    runs, failed = {}, {}
    for name in args.runs:
        loader, compiled = RUNS[name]
        output_dir = str(workdir / f"indexer-{name}")
        config = replace(base, output_dir=output_dir, loader=loader, compile=compiled, max_steps=windows.total)
        try:
            measured = timed_training(config, windows, cuda, not compiled, state.num_processes)
            timed_only = Windows(args.warmup, args.steps, 0, 0)
            measured["premade"] = premade_training(shards["train"], config, timed_only, cuda, args.ring_batches, state)
            runs[name] = measured
        except Exception as error:  # noqa: BLE001 (one variant failing, e.g. torch.compile here, keeps the others)
            traceback.print_exc()
            failed[name] = f"{type(error).__name__}: {error}"
            continue
        runs[name]["loader_s_per_sample"] = {
            length: loader_seconds_per_batch(probe, loader, config, args.probe_batches, state.device) / args.batch_size
            for length, probe in sorted(probed.items())
        }
    if not runs:
        raise SystemExit(f"every run failed: {failed}")
    profiles = {}
    if args.profile_loader and state.is_main_process:
        for loader in dict.fromkeys(RUNS[name][0] for name in runs):
            profiles[loader] = profile_loader(shards["train"], loader, base, args.profile_loader, state.device)
    if state.is_main_process:
        results = {**summarize(args, backbone, shards["train"], runs, generation_s, cuda), "failed_runs": failed,
                   "loader_profile": profiles}
        Path(args.output).write_text(json.dumps(results, indent=2))
        print_profiles(profiles)
        print_table(results)


def summarize(args, backbone, shards: LabelShards, runs: dict, generation_s: float, cuda: bool) -> dict:
    flops = next((run["flops_per_step"] for run in runs.values() if run["flops_per_step"]), None)
    floor_s = flops / (args.peak_tflops * 1e12) if flops else None
    tau, processes = shards.manifest["labels"]["tau"], PartialState().num_processes
    for run in runs.values():
        loader = run["loader_s_per_sample"]  # one process's loader
        run["loader_alone_share"] = min(1.0, loader[args.tokens] * args.batch_size / (run["step_ms"] / 1e3))
        run["loader_exposed_share"] = 1 - run["premade"]["step_ms"] / run["step_ms"]  # < 0: noise
        together = {length: seconds / processes for length, seconds in loader.items()}  # processes load at once
        run["paper"] = paper_estimate(1 / run["samples_per_s"], together, args.tokens, tau)
    label_bytes = sum(path.stat().st_size for path in shards.directory.glob("*.safetensors"))
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "processes": processes,
        "sample": "one trigger step: a (document, trigger) pair scored by every target layer against its "
        "positives and sampled negatives",
        "backbone": {"hidden": backbone.hidden_size, "index_head_dim": backbone.index_head_dim,
                     "layers": backbone.num_hidden_layers, "target_layers": shards.target_layers},
        "indexer": {"num_heads": 4 if args.small else 128, "rank": 32 if args.small else 2048, "bf16": True},
        "data": {"documents": args.documents, "tokens": args.tokens, "trigger_steps": shards.num_triggers,
                 "generation_s": generation_s, "label_bytes_per_token": label_bytes / (args.documents * args.tokens)},
        "batch_size": args.batch_size,
        "switch_interval_s": sys.getswitchinterval(),
        "ring_batches": args.ring_batches,
        "windows": asdict(Windows(args.warmup, args.steps, args.profile_steps if cuda else 0, args.flop_steps)),
        "peak_tflops_assumed": args.peak_tflops,
        "flops_per_step": flops,
        "floor": {"step_ms": floor_s * 1e3, "samples_per_s": args.batch_size / floor_s} if floor_s else None,
        "paper": {**PAPER, "trigger_steps": next(iter(runs.values()))["paper"]["trigger_steps"]},
        "runs": runs,
    }


def print_profiles(profiles: dict) -> None:
    for loader, found in profiles.items():
        threads = found["self_cpu_ms_per_batch"]
        print(f"\n{loader} loader over {found['batches']} batches: host {found['host_ms_per_batch']:.3f} ms a batch "
              f"(main thread inside next(), unprofiled), wall {found['wall_ms_per_batch']:.3f} ms a batch "
              f"(synchronized); profiled self CPU ms a batch: main thread {threads['main_thread']:.3f}, "
              f"other threads {threads['other_threads']:.3f}")
        tables = {"loader ranges": found["ranges"], f"top {TOP_OPS} by self CPU": found["top_self_cpu"],
                  f"top {TOP_OPS} by CUDA": found["top_cuda"]}
        for title, rows in tables.items():
            if not rows:
                continue
            print(f"  {title}: {'calls':>7} | self CPU ms | CPU ms | self CUDA ms (per batch)")
            for row in rows:
                print(f"  {row['name'][:60]:<60} {row['calls_per_batch']:7.1f} | "
                      f"{row['self_cpu_ms_per_batch']:11.3f} | {row['cpu_ms_per_batch']:6.3f} | "
                      f"{row['self_cuda_ms_per_batch']:.3f}")


def print_table(results: dict) -> None:
    data, indexer, paper, floor = results["data"], results["indexer"], results["paper"], results["floor"]
    layers = len(results["backbone"]["target_layers"])
    print(f"\n{results['device']} x {results['processes']}: memory indexer, {layers} layers x {indexer['num_heads']} "
          f"heads, rank {indexer['rank']}, bf16; {results['batch_size']} samples a step")
    print(f"sample = {results['sample']}")
    print(f"data: {data['documents']} documents x {data['tokens']} tokens ({data['trigger_steps']} trigger steps), "
          f"written in {data['generation_s']:.1f} s; paper: {paper['trigger_steps'] / 1e6:.1f}M trigger steps")
    if floor:
        print(f"floor: {results['flops_per_step'] / 1e9:.1f} GFLOP a step at {results['peak_tflops_assumed']:.0f} "
              f"TFLOP/s (dense bf16 peak assumed) = {floor['step_ms']:.3f} ms a step, {floor['samples_per_s']:.0f} "
              f"samples/s")
    print(f"\nloss curves (mean over each {LOG_EVERY} steps, from the first step):")
    for name, run in results["runs"].items():
        print(f" {name:>16}: " + " ".join(f"{loss:.4f}" for _, loss in run["loss_curve"]))
    print("\nloader ms/sample by document length:")
    for name, run in results["runs"].items():
        print(f" {name:>16}: " + ", ".join(f"{n}: {s * 1e3:.3f}" for n, s in run["loader_s_per_sample"].items()))
    print("loader share: alone = the loader by itself over the step; exposed = 1 - step ms fed "
          f"{results['ring_batches']} pre-made batches / step ms")
    print(f"\n {'run':>16} | samples/s | step ms | GPU util | NVML % | loader alone | loader exposed | "
          f"premade step ms | peak GiB | paper h | "
          f"paper h, loader scaled (needs {paper['trigger_steps'] / (paper['gpu_hours'] * 3600):.0f} samples/s for "
          f"{paper['gpu_hours']:.0f} h)")
    for name, run in results["runs"].items():
        util = f"{run['gpu_utilization']:.0%}" if run["gpu_utilization"] is not None else "n/a"
        nvml = f"{run['nvml_utilization_percent']}" if run["nvml_utilization_percent"] is not None else "n/a"
        peak = f"{run['peak_gpu_bytes'] / 2**30:.2f}" if run["peak_gpu_bytes"] else "n/a"
        print(f" {name:>16} | {run['samples_per_s']:9.0f} | {run['step_ms']:7.2f} | {util:>8} | {nvml:>6} | "
              f"{run['loader_alone_share']:12.0%} | {run['loader_exposed_share']:14.0%} | "
              f"{run['premade']['step_ms']:15.2f} | {peak:>8} | {run['paper']['hours_at_measured_rate']:7.2f} | "
              f"{run['paper']['hours_loader_scaled']:.2f}")
    for name, error in results["failed_runs"].items():
        print(f" {name:>16} | failed: {error}")


if __name__ == "__main__":
    main()
