"""The label dump: a frozen DeepSeek-V4 over documents, teacher-forced, into label shards (see shards.py).

Documents are prefilled through the stock model chunk by chunk with a DynamicCache, exactly as a long prompt
would be, `batch_size` documents per forward (right-padded to the longest: causal attention keeps the padding out
of every real token, and nothing past a document's own length is read back); the hooks of capture.py turn every
chunk's native indexer scores into per-token nuclei on the spot, so memory is bounded by one chunk (documents x
chunk tokens x history), never by the document (tokens x history).
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
from .capture import ForwardCapture, IndexerCapture
from .labels import LabelConfig, LookaheadUnion, effective_vote, layer_votes, picked_pairs, trigger_positions
from .shard_writer import ShardWriter
from .shards import FORMAT, MANIFEST, VERSION, atomic_write_json, backbone_identity, read_manifest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DumpConfig:
    """target_layers: the CSA layers whose hidden states and keys are stored (the memory indexer's layers).
    chunk_size: tokens per forward; the backbone's own peak memory grows with chunk_size x history.
    batch_size: documents per forward; a small backbone is bound by kernel launches, not arithmetic, at one
    document, and its peak memory grows with batch_size x chunk_size x history.
    shard_bytes, docs_per_shard: a shard file holds at most this many bytes and documents; a longer document is
    cut into parts over several files (shard_writer.py).
    """

    target_layers: tuple[int, ...]
    labels: LabelConfig = field(default_factory=LabelConfig)
    chunk_size: int = 1024
    batch_size: int = 1
    docs_per_shard: int = 16
    shard_bytes: int = 256 * 2**20

    def __post_init__(self):
        sizes = {name: getattr(self, name) for name in ("chunk_size", "batch_size", "docs_per_shard", "shard_bytes")}
        wrong = {name: value for name, value in sizes.items() if value < 1}
        if wrong:
            raise ValueError(f"{', '.join(wrong)} must be positive, got {', '.join(map(str, wrong.values()))}")


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
        for first in range(0, len(todo), config.batch_size):
            batch = todo[first : first + config.batch_size]
            inputs = [document.input_ids for document in batch]
            labelled = label_documents(model, capture, inputs, settings, config.chunk_size, progress)
            for document, tensors in zip(batch, labelled, strict=True):
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
def label_documents(
    model, capture: IndexerCapture, documents: list[list[int]], settings: dict, chunk_size: int, progress
) -> list[dict]:
    """The stored tensors of each document (names as in shards.py, without the document prefix), from one batch
    of forwards over the documents right-padded to the longest."""
    lengths = [len(input_ids) for input_ids in documents]
    ids = torch.full((len(documents), max(lengths)), model.config.pad_token_id or 0, dtype=torch.long)
    for row, input_ids in enumerate(documents):
        ids[row, : len(input_ids)] = torch.tensor(input_ids, dtype=torch.long)
    ids = ids.to(model.device)
    compress_rate = csa_compress_rate(model.config)
    labels = [DocumentLabels(length, settings, compress_rate) for length in lengths]
    cache = DynamicCache(config=model.config)
    capture.triggers = [document.triggers for document in labels]
    for start in range(0, ids.shape[1], chunk_size):
        model(input_ids=ids[:, start : start + chunk_size], past_key_values=cache, use_cache=True, logits_to_keep=1)
        taken = capture.take()
        for row, document in enumerate(labels):
            document.add(taken, row)
        progress.update(sum(min(chunk_size, max(length - start, 0)) for length in lengths))
    keys = {layer: cache.layers[layer].compressed_kv["indexer"] for layer in settings["target_layers"]}
    return [document.tensors({layer: rows[row] for layer, rows in keys.items()}) for row, document in enumerate(labels)]


class DocumentLabels:
    """One document's labels, gathered forward by forward: the voted golden sets, every layer's most votes, the
    native top-k picks per trigger window, and the target layers' hidden states at the triggers."""

    def __init__(self, length: int, settings: dict, compress_rate: int):
        labels = settings["labels"]
        self.length = length
        self.compress_rate = compress_rate
        self.vote = labels["vote_applied"]
        self.triggers = trigger_positions(length, labels["warmup"], labels["tau"])
        self.golden = LookaheadUnion(self.triggers, labels["tau"], compress_rate)
        self.used = LookaheadUnion(self.triggers, labels["tau"], compress_rate)
        self.votes = LookaheadUnion(self.triggers, labels["tau"], compress_rate, reduce="max")
        self.hidden = {layer: [] for layer in settings["target_layers"]}

    def add(self, taken: ForwardCapture, row: int) -> None:
        """What one forward left for this document (its row of the batch)."""
        nuclei = [(indices[row], keep[row]) for indices, keep in taken.nucleus_sets.values()]
        rows, chunks, layers = layer_votes(nuclei)
        voted = layers >= self.vote
        self.golden.add(taken.positions[rows[voted]], chunks[voted])
        self.votes.add(taken.positions[rows], chunks, layers)
        rows, chunks = picked_pairs([indices[row] for indices in taken.used.values()])
        self.used.add(taken.positions[rows], chunks)
        for layer, states in taken.hidden.items():
            self.hidden[layer].append(states[row])

    def tensors(self, keys: dict[int, torch.Tensor]) -> dict:
        """keys: target layer -> its compressed index keys over the padded batch row; only the chunks made of
        this document's own tokens are kept."""
        label_indptr, label_indices, _ = self.golden.to_csr()
        used_indptr, used_indices, used_counts = self.used.to_csr()
        votes_indptr, votes_indices, votes_layers = self.votes.to_csr()
        tensors = {
            "positions": self.triggers,
            "labels/indptr": label_indptr,
            "labels/indices": label_indices,
            "used/indptr": used_indptr,
            "used/indices": used_indices,
            "used/counts": used_counts,
            "votes/indptr": votes_indptr,
            "votes/indices": votes_indices,
            "votes/counts": votes_layers.to(torch.uint8),
        }
        chunks = self.length // self.compress_rate
        for layer, layer_keys in keys.items():
            tensors[f"hidden/{layer}"] = torch.cat(self.hidden[layer])
            tensors[f"keys/{layer}"] = layer_keys[:chunks].detach().cpu()
        return tensors
