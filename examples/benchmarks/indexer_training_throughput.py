"""Memory-indexer training throughput at DeepSeek-V4-Flash sizes, and what it means for the paper's training set.

    python examples/benchmarks/indexer_training_throughput.py --out indexer_training_throughput.json
    python examples/benchmarks/indexer_training_throughput.py --small     # CPU smoke test, tiny sizes

The trainer never sees the backbone, only label shards, so its speed depends on the shapes in the shards and
not on their values. The script therefore writes synthetic shards in the dump's own format (shards.py writer,
manifest laid out as dump.py lays it out, fingerprint from shards.backbone_identity over a random stand-in for
the weight the dump hashes) for a backbone shaped like DeepSeek-V4-Flash: hidden 4096, index keys of 128, 43
layers (0-1 sliding, then CSA on even and HCA on odd layers), target layers 22, 26, 42 (the paper's CSA
ordinals 10, 12, 20). Per document of N tokens: a trigger every tau = 64 tokens from the sliding window on,
hidden states (triggers, 4096) and frozen keys (N / 4, 128) per target layer in bf16, 100-1000 golden positives
per trigger (never more than the chunks that exist at it) and a set of 512-2048 chunks the native top-k picked.

Then it runs the real trainer (trainer.train, what `fm-indexer train` calls) with a release-size indexer
(128 heads, rank 2048) and bf16 mixed precision. A *sample* is one trigger step: one (document, trigger) pair,
scored by every target layer against its positives and 3x as many sampled negatives; an optimizer step takes
--batch-size samples. Step times are read through torch's global optimizer post-step hook, so the trainer runs
unchanged; the first --warmup steps are left out.

The data loader runs in the training process between steps, and drawing a sample's negatives costs time in
proportion to the chunks visible at its trigger, so a sample of a 512K-token document costs more than one of a
16K one. The probe times the loader alone (same dataset, sampler and collate) on documents of N, 128K and 512K
tokens. The estimate for the paper's data (10,000 documents of 16K-512K tokens, log-uniform, tokens / 64 trigger
steps each, one epoch) adds, per document length, the loader's extra cost over the N-token documents to the
measured time per sample; the GPU work per step barely depends on the length, as candidate sets are padded to
the largest in the batch, about 4 x 1000 chunks at any length. The probes run first: should the loader alone
need more than --train-budget-s for --steps steps (a slow host), fewer steps are timed and the output says so.
Prints a table last; writes JSON to --out.
"""

import argparse
import itertools
import json
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.data import DataLoader
from transformers import DeepseekV4Config

from fm_transformers.indexer import default_target_layers
from fm_transformers.training import DumpConfig, LabelShards, TrainConfig, train
from fm_transformers.training.dataset import DocumentBlockSampler, TriggerDataset, collate_triggers
from fm_transformers.training.labels import effective_vote, trigger_positions, visible_chunks
from fm_transformers.training.shards import FORMAT, MANIFEST, VERSION, atomic_write_json, backbone_identity, write_shard

SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
# The paper trains its indexer on this set in about one GPU-hour.
PAPER = {"documents": 10_000, "min_tokens": 16_384, "max_tokens": 524_288, "gpu_hours": 1.0}
FULL = {"hidden": 4096, "index_head_dim": 128, "tokens": 16_384, "positives": (100, 1000), "probe": (131_072, 524_288)}
SMALL = {"hidden": 64, "index_head_dim": 16, "tokens": 1024, "positives": (4, 40), "probe": (2048, 4096)}


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
    chunks = tokens // rate
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
        tensors[f"keys/{layer}"] = torch.randn(chunks, config.index_head_dim, generator=generator, dtype=torch.bfloat16)
    return tensors


def write_label_set(
    directory: Path, lengths: list[int], config: DeepseekV4Config, identity: dict, sizes: dict, seed: int
) -> LabelShards:
    """A complete label directory, manifest and shards laid out as dump.dump_labels writes them."""
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
        "documents": doc_ids,
        "shards": [],
        "complete": False,
    }
    directory.mkdir(parents=True)
    for index, first in enumerate(range(0, len(lengths), dump.docs_per_shard)):
        tensors, entries = {}, []
        for position, doc in enumerate(range(first, min(first + dump.docs_per_shard, len(lengths)))):
            document = synthetic_document(lengths[doc], manifest, config, sizes, seed * 100_003 + doc)
            tensors.update({f"{position}/{name}": tensor for name, tensor in document.items()})
            triggers, chunks = document["positions"].numel(), document[f"keys/{dump.target_layers[0]}"].shape[0]
            entry = {"prefix": f"{position}/", "tokens": lengths[doc], "triggers": triggers, "chunks": chunks}
            entries.append({"id": doc_ids[doc], **entry})
        name = f"shard-{index:05d}.safetensors"
        write_shard(directory / name, tensors, identity["fingerprint"], [entry["id"] for entry in entries])
        manifest["shards"].append({"file": name, "documents": entries})
        atomic_write_json(directory / MANIFEST, manifest)
    manifest["complete"] = True
    atomic_write_json(directory / MANIFEST, manifest)
    return LabelShards(directory)


class StepClock:
    """Wall time at the end of every optimizer step (and the peak GPU memory then), taken by a global hook."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.times: list[float] = []
        self.peak_bytes: int | None = None

    def __enter__(self):
        self._handle = register_optimizer_step_post_hook(self._tick)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def _tick(self, optimizer, args, kwargs) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated()
        self.times.append(time.perf_counter())


def timed_training(config: TrainConfig, samples_per_epoch: int, warmup: int, cuda: bool) -> dict:
    """Run trainer.train and measure optimizer steps warmup + 1 .. max_steps; a partial batch ends each epoch."""
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with StepClock(cuda) as clock:
        train(config)
    batches_per_epoch = -(-samples_per_epoch // config.batch_size)
    last_batch = samples_per_epoch - config.batch_size * (batches_per_epoch - 1)
    samples = sum(
        last_batch if (step + 1) % batches_per_epoch == 0 else config.batch_size
        for step in range(warmup, len(clock.times))
    )
    seconds = clock.times[-1] - clock.times[warmup - 1]
    return {
        "timed_steps": len(clock.times) - warmup,
        "timed_samples": samples,
        "steps_per_s": (len(clock.times) - warmup) / seconds,
        "samples_per_s": samples / seconds,
        "peak_gpu_bytes": clock.peak_bytes,
        "train_call_s": time.perf_counter() - start,  # includes model setup and the final checkpoint
    }


def loader_seconds_per_sample(shards: LabelShards, layers: list[int], config: TrainConfig, batches: int) -> float:
    """The trainer's loader alone; the first batch is left out (it also reads the document)."""
    dataset = TriggerDataset(shards, layers, config.negative_ratio, config.seed)
    loader = DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=DocumentBlockSampler(dataset, config.seed),
        collate_fn=collate_triggers,
    )
    iterator = iter(loader)
    next(iterator)
    start, samples = time.perf_counter(), 0
    for batch in itertools.islice(iterator, batches):
        samples += batch["targets"].shape[0]
    if samples == 0:
        raise ValueError(f"{shards.directory} has a single batch of trigger steps: probe longer documents")
    return (time.perf_counter() - start) / samples


def paper_estimate(seconds_per_sample: float, loader: dict[int, float], tokens: int, tau: int) -> dict:
    """Hours for one epoch over the paper's documents; lengths drawn log-uniform with a fixed seed."""
    rng = np.random.default_rng(0)
    low, high = np.log(PAPER["min_tokens"]), np.log(PAPER["max_tokens"])
    lengths = np.exp(rng.uniform(low, high, PAPER["documents"]))
    triggers = np.floor(lengths / tau)
    probed = sorted(loader)
    extra = np.interp(lengths, probed, [loader[length] for length in probed]) - loader[tokens]
    return {
        **PAPER,
        "tokens": float(lengths.sum()),
        "trigger_steps": int(triggers.sum()),
        "hours_at_measured_rate": float(triggers.sum() * seconds_per_sample / 3600),
        "hours_loader_scaled": float((triggers * (seconds_per_sample + extra)).sum() / 3600),
        "samples_per_s_for_paper_hours": float(triggers.sum() / (PAPER["gpu_hours"] * 3600)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny sizes and a few steps: a CPU smoke test")
    parser.add_argument("--documents", type=int, default=None, help="training documents (default 8; 4 with --small)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens a document (16384; 1024 with --small)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 200; 6 with --small)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 20; 2 with --small)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the trainer's (8 with --small)")
    parser.add_argument("--probe-batches", type=int, default=4, help="timed loader batches per probed length")
    parser.add_argument(
        "--train-budget-s",
        type=float,
        default=90.0,
        help="if the loader alone would take longer than this over --steps, run fewer steps (said in the output)",
    )
    parser.add_argument("--data-dir", default=None, help="new directory for shards and the indexer (default: temp)")
    parser.add_argument("--out", default="indexer_training_throughput.json")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.small:
        raise SystemExit("the full-size benchmark needs a CUDA GPU: run with --small for a CPU smoke test")
    defaults = (
        {"documents": 4, "steps": 6, "warmup": 2, "batch_size": 8}
        if args.small
        else {"documents": 8, "steps": 200, "warmup": 20, "batch_size": TrainConfig.batch_size}
    )
    for key, value in defaults.items():
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    sizes = SMALL if args.small else FULL
    args.tokens = args.tokens or sizes["tokens"]
    if not 0 < args.warmup < args.steps:
        raise SystemExit(f"--warmup must be between 1 and --steps - 1, got {args.warmup} of {args.steps}")
    if args.data_dir and Path(args.data_dir).exists() and any(Path(args.data_dir).iterdir()):
        raise SystemExit(f"{args.data_dir} is not empty: pass a new or empty --data-dir")
    if args.data_dir:
        run(args, sizes, cuda, Path(args.data_dir))
    else:
        with tempfile.TemporaryDirectory() as directory:
            run(args, sizes, cuda, Path(directory))


def run(args, sizes: dict, cuda: bool, workdir: Path) -> None:
    """Shards, loader probes (they also size the run to the budget), the timed training, the estimate."""
    backbone = flash_backbone(args.small)
    start = time.perf_counter()
    identity = stand_in_identity(backbone, torch.Generator().manual_seed(0))
    shards = write_label_set(workdir / "train", [args.tokens] * args.documents, backbone, identity, sizes, seed=0)
    probes = {
        length: write_label_set(workdir / f"probe-{length}", [length], backbone, identity, sizes, seed=length)
        for length in sizes["probe"]
        if length != args.tokens
    }
    generation_s = time.perf_counter() - start
    config = TrainConfig(
        data=str(shards.directory),
        output_dir=str(workdir / "indexer"),
        max_steps=args.steps,
        batch_size=args.batch_size,
        bf16=True,
        cpu=not cuda,
        **({"num_heads": 4, "rank": 32} if args.small else {}),
    )
    loader = {
        length: loader_seconds_per_sample(probe, probe.target_layers, config, args.probe_batches)
        for length, probe in [(args.tokens, shards), *probes.items()]
    }
    affordable = int(args.train_budget_s / (loader[args.tokens] * config.batch_size))
    config = replace(config, max_steps=min(args.steps, max(args.warmup + 10, affordable)))
    if config.max_steps < args.steps:
        print(
            f"the loader takes {loader[args.tokens] * 1e3:.1f} ms/sample here: timing {config.max_steps} steps, "
            f"not {args.steps}, to stay within --train-budget-s {args.train_budget_s:.0f}"
        )
    training = timed_training(config, shards.num_triggers, args.warmup, cuda)
    label_bytes = sum(path.stat().st_size for path in shards.directory.glob("*.safetensors"))
    tau = shards.manifest["labels"]["tau"]
    results = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "sample": "one trigger step: a (document, trigger) pair scored by every target layer against its "
        "positives and sampled negatives",
        "backbone": {
            "hidden": backbone.hidden_size,
            "index_head_dim": backbone.index_head_dim,
            "layers": backbone.num_hidden_layers,
            "target_layers": shards.target_layers,
        },
        "indexer": {"num_heads": config.num_heads, "rank": config.rank, "bf16": config.bf16},
        "data": {
            "documents": args.documents,
            "tokens": args.tokens,
            "trigger_steps": shards.num_triggers,
            "positives_per_trigger": sizes["positives"],
            "generation_s": generation_s,
            "label_bytes_per_token": label_bytes / (args.documents * args.tokens),
        },
        "batch_size": config.batch_size,
        "steps": config.max_steps,
        "steps_requested": args.steps,
        "warmup_steps": args.warmup,
        "training": training,
        "loader_s_per_sample": loader,
        "paper_estimate": paper_estimate(1 / training["samples_per_s"], loader, args.tokens, tau),
    }
    Path(args.out).write_text(json.dumps(results, indent=2))
    print_table(results)


def print_table(results: dict) -> None:
    training, paper, loader = results["training"], results["paper_estimate"], results["loader_s_per_sample"]
    data, indexer = results["data"], results["indexer"]
    peak = training["peak_gpu_bytes"]
    print(
        f"\n{results['device']}: memory indexer, {len(results['backbone']['target_layers'])} layers x "
        f"{indexer['num_heads']} heads, rank {indexer['rank']}, bf16; {results['batch_size']} samples a step"
    )
    print(f"sample = {results['sample']}")
    print(
        f"data: {data['documents']} documents x {data['tokens']} tokens ({data['trigger_steps']} trigger steps), "
        f"written in {data['generation_s']:.1f} s; timed steps {results['warmup_steps'] + 1}-{results['steps']}"
    )
    print(
        f"paper data: {paper['documents']} documents, {paper['min_tokens']}-{paper['max_tokens']} tokens "
        f"log-uniform, {paper['trigger_steps'] / 1e6:.1f}M trigger steps, one epoch, labels "
        f"~{data['label_bytes_per_token'] * paper['tokens'] / 1e12:.2f} TB"
    )
    print("\n tokens/doc | loader ms/sample")
    for length in sorted(loader):
        print(f" {length:10d} | {loader[length] * 1e3:16.3f}")
    gib = f"{peak / 2**30:.2f}" if peak else "n/a"
    share = loader[data["tokens"]] * training["samples_per_s"]
    print(
        f"\n steps/s | samples/s | peak GPU GiB | loader share | paper hours: measured rate | length-scaled | "
        f"paper (needs {paper['samples_per_s_for_paper_hours']:.0f} samples/s)"
    )
    print(
        f" {training['steps_per_s']:7.2f} | {training['samples_per_s']:9.1f} | {gib:>12} | {share:12.0%} | "
        f"{paper['hours_at_measured_rate']:26.2f} | {paper['hours_loader_scaled']:13.2f} | {paper['gpu_hours']:.1f}"
    )


if __name__ == "__main__":
    main()
