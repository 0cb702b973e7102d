"""The label dump: a frozen DeepSeek-V4 over documents, teacher-forced, into label shards (see shards.py).

Each document is prefilled through the stock model chunk by chunk with a DynamicCache, exactly as a long prompt
would be; the hooks of capture.py turn every chunk's native indexer scores into per-token nuclei on the spot,
so memory is bounded by one chunk (chunk tokens x history), never by the document (tokens x history).
Shards have a bounded size whatever the document lengths (shard_writer.py). The dump is resumable: documents
already listed in the manifest are skipped when the same command runs again.
"""

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from ..document import Document
from ..layout import csa_compress_rate
from .capture import IndexerCapture
from .labels import LabelConfig, LookaheadUnion, effective_vote, layer_votes, picked_pairs, trigger_positions
from .shard_writer import ShardWriter
from .shards import FORMAT, MANIFEST, VERSION, atomic_write_json, backbone_identity, read_manifest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DumpConfig:
    """target_layers: the CSA layers whose hidden states and keys are stored (the memory indexer's layers).
    chunk_size: tokens per forward; the backbone's own peak memory grows with chunk_size x history.
    shard_bytes, docs_per_shard: a shard file holds at most this many bytes and documents; a longer document is
    cut into parts over several files (shard_writer.py).
    """

    target_layers: tuple[int, ...]
    labels: LabelConfig = field(default_factory=LabelConfig)
    chunk_size: int = 1024
    docs_per_shard: int = 16
    shard_bytes: int = 256 * 2**20

    def __post_init__(self):
        if self.chunk_size < 1 or self.docs_per_shard < 1 or self.shard_bytes < 1:
            raise ValueError(
                f"chunk_size, docs_per_shard and shard_bytes must be positive, got {self.chunk_size}, "
                f"{self.docs_per_shard} and {self.shard_bytes}"
            )


def dump_labels(
    model, documents: list[Document], output_dir: str | Path, config: DumpConfig, name_or_path: str
) -> dict:
    """Write (or finish writing) the label set of `documents` to `output_dir`; returns the manifest.

    Every check runs before the first file is written, so a bad input leaves nothing behind; the manifest
    first appears with the first finished shard.
    """
    identity = backbone_identity(model, name_or_path)
    settings = _settings(identity, config, model.config.vocab_size, documents)
    output_dir = Path(output_dir)
    manifest = _start_manifest(output_dir, identity, settings)
    done = {entry["id"] for shard in manifest["shards"] for entry in shard["documents"]}
    todo = [document for document in documents if document.doc_id not in done]
    if done:
        logger.info("resuming the dump in %s: %d of %d documents written", output_dir, len(done), len(documents))
    output_dir.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(output_dir, manifest, config.shard_bytes, config.docs_per_shard)
    with (
        IndexerCapture(model, settings["target_layers"], config.labels.nucleus) as capture,
        tqdm(total=sum(len(document.input_ids) for document in todo), unit="tok", desc="dump-labels") as progress,
    ):
        for document in todo:
            tensors = label_document(model, capture, document.input_ids, settings, config.chunk_size, progress)
            writer.add(document.doc_id, len(document.input_ids), tensors)
        writer.close()
    manifest["complete"] = True
    atomic_write_json(output_dir / MANIFEST, manifest)
    return manifest


def _settings(identity: dict, config: DumpConfig, vocab_size: int, documents: list[Document]) -> dict:
    if not documents:
        raise ValueError("no documents to label: pass at least one document")
    csa = identity["csa_layers"]
    targets = sorted(set(config.target_layers))
    wrong = [layer for layer in targets if layer not in csa]
    if not targets or wrong:
        raise ValueError(f"target layers {wrong or targets} are not CSA layers of this backbone: choose among {csa}")
    labels = config.labels
    warmup = labels.resolved_warmup(identity["sliding_window"])
    minimum = max(identity["sliding_window"], warmup + labels.tau)
    for document in documents:
        length = len(document.input_ids)
        if length < minimum:
            raise ValueError(
                f"document {document.doc_id!r} has {length} tokens; labels need at least {minimum} (the sliding "
                f"window is {identity['sliding_window']}, the first trigger comes after a warm-up of {warmup} and "
                f"needs a lookahead of tau={labels.tau}): drop short documents or lower --warmup / --tau"
            )
        if max(document.input_ids) >= vocab_size:
            raise ValueError(
                f"document {document.doc_id!r} has token id {max(document.input_ids)} but the model's vocabulary "
                f"has {vocab_size}: tokenize with this model's tokenizer"
            )
    return {
        "target_layers": targets,
        "labels": {**asdict(labels), "warmup": warmup, "vote_applied": effective_vote(labels.vote, len(csa))},
        "chunk_size": config.chunk_size,
        "docs_per_shard": config.docs_per_shard,
        "shard_bytes": config.shard_bytes,
        "documents": [document.doc_id for document in documents],
    }


def _start_manifest(output_dir: Path, identity: dict, settings: dict) -> dict:
    """A fresh manifest, or the existing one if it was started by the same backbone with the same settings."""
    if not (output_dir / MANIFEST).is_file():
        if output_dir.exists() and any(output_dir.iterdir()):
            raise FileExistsError(f"{output_dir} is not empty and holds no label manifest: choose a new --output")
        return {"format": FORMAT, "version": VERSION, "backbone": identity, **settings, "shards": [], "complete": False}
    manifest = read_manifest(output_dir)
    if manifest["backbone"]["fingerprint"] != identity["fingerprint"]:
        raise ValueError(
            f"{output_dir} holds labels of another backbone ({manifest['backbone']['name_or_path']}, fingerprint "
            f"{manifest['backbone']['fingerprint']}; this one is {identity['fingerprint']}): choose a new --output"
        )
    changed = [key for key, value in settings.items() if manifest.get(key) != value]
    if changed:
        raise ValueError(
            f"{output_dir} was started with other {', '.join(changed)}: resume with the same documents and "
            f"settings, or choose a new --output"
        )
    return manifest


@torch.inference_mode()
def label_document(model, capture: IndexerCapture, input_ids: list[int], settings: dict, chunk_size: int, progress):
    """The stored tensors of one document (names as in shards.py, without the document prefix)."""
    labels = settings["labels"]
    compress_rate = csa_compress_rate(model.config)
    triggers = trigger_positions(len(input_ids), labels["warmup"], labels["tau"])
    golden = LookaheadUnion(triggers, labels["tau"], compress_rate)
    used = LookaheadUnion(triggers, labels["tau"], compress_rate)
    votes = LookaheadUnion(triggers, labels["tau"], compress_rate, reduce="max")
    hidden = {layer: [] for layer in settings["target_layers"]}
    ids = torch.tensor(input_ids, dtype=torch.long, device=model.device).unsqueeze(0)
    cache = DynamicCache(config=model.config)
    capture.triggers = triggers
    for start in range(0, ids.shape[1], chunk_size):
        model(input_ids=ids[:, start : start + chunk_size], past_key_values=cache, use_cache=True, logits_to_keep=1)
        taken = capture.take()
        rows, chunks, layers = layer_votes(list(taken.nucleus_sets.values()))
        voted = layers >= labels["vote_applied"]
        golden.add(taken.positions[rows[voted]], chunks[voted])
        votes.add(taken.positions[rows], chunks, layers)
        rows, chunks = picked_pairs(list(taken.used.values()))
        used.add(taken.positions[rows], chunks)
        for layer, states in taken.hidden.items():
            hidden[layer].append(states)
        progress.update(min(chunk_size, ids.shape[1] - start))
    label_indptr, label_indices, _ = golden.to_csr()
    used_indptr, used_indices, used_counts = used.to_csr()
    votes_indptr, votes_indices, votes_layers = votes.to_csr()
    tensors = {
        "positions": triggers,
        "labels/indptr": label_indptr,
        "labels/indices": label_indices,
        "used/indptr": used_indptr,
        "used/indices": used_indices,
        "used/counts": used_counts,
        "votes/indptr": votes_indptr,
        "votes/indices": votes_indices,
        "votes/counts": votes_layers.to(torch.uint8),
    }
    for layer in settings["target_layers"]:
        tensors[f"hidden/{layer}"] = torch.cat(hidden[layer])
        tensors[f"keys/{layer}"] = cache.layers[layer].compressed_kv["indexer"][0].detach().cpu()
    return tensors
