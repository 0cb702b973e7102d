"""The on-disk label dataset: safetensors shards of documents plus one JSON manifest.

A directory holds `manifest.json` and `shard-NNNNN.safetensors` files. Per document a shard stores
    {doc}/hidden/{layer}   (triggers, hidden)      hidden state entering each target layer's attention
    {doc}/keys/{layer}     (chunks, index_head_dim) that layer's frozen native indexer keys, whole document
    {doc}/positions        (triggers,)             token position of each trigger step
    {doc}/labels/indptr, {doc}/labels/indices      CSR golden positives (lookahead union) per trigger
    {doc}/used/indptr, {doc}/used/indices, {doc}/used/counts
                                                   CSR chunks the native top-k picked in the window, with how
                                                   many (token, CSA layer) picks each got
The manifest names the backbone (name, dimensions, and a fingerprint of its weights) and the label settings;
every shard repeats the fingerprint, so a shard from another backbone is refused wherever it turns up.
Invariant: every file in the directory is complete. Writes go to a temporary name and are renamed into place,
and a shard is listed in the manifest only after it is renamed.
"""

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import DeepseekV4Config

from ..indexer import BACKBONE_FIELDS
from ..layout import csa_compress_rate, csa_layers

FORMAT = "fm-indexer-labels"
VERSION = 1
MANIFEST = "manifest.json"


def backbone_identity(model, name_or_path: str) -> dict:
    """What a label set depends on: the backbone's dimensions and a hash of its first native indexer's weights.

    Two dumps are compatible only if their fingerprints match: same dimensions with other weights (another
    checkpoint, another seed) give other indexer keys, and an indexer trained on those would not fit.
    """
    config = model.config
    if getattr(config, "model_type", None) != "deepseek_v4":
        raise ValueError(
            f"labels are made from a DeepSeek-V4 backbone; got {type(model).__name__} with model_type="
            f"{getattr(config, 'model_type', None)!r}: load a DeepSeek-V4 checkpoint (or --model tiny)"
        )
    dims = {field: json.loads(json.dumps(getattr(config, field))) for field in BACKBONE_FIELDS}
    csa = csa_layers(config)
    if not csa:
        raise ValueError("this DeepSeek-V4 config has no compressed_sparse_attention layer: nothing to label")
    weight = model.model.layers[csa[0]].self_attn.compressor.indexer.kv_proj.weight
    digest = hashlib.sha256(json.dumps(dims, sort_keys=True).encode())
    digest.update(weight.detach().float().cpu().contiguous().numpy().tobytes())
    return {
        "name_or_path": name_or_path,
        "fingerprint": digest.hexdigest()[:16],
        "config": dims,
        "csa_layers": csa,
        "index_topk": config.index_topk,
        "sliding_window": config.sliding_window,
        "compress_rate": csa_compress_rate(config),
    }


def backbone_config(identity: dict) -> DeepseekV4Config:
    """A DeepseekV4Config with the recorded dimensions: what the trainer builds an indexer for, weights unseen."""
    return DeepseekV4Config(**identity["config"])


def atomic_write_json(path: Path, payload: dict) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(temporary, path)


def write_shard(path: Path, tensors: dict[str, torch.Tensor], fingerprint: str, doc_ids: list[str]) -> None:
    """Write one shard under a temporary name and rename it: a crash leaves no partial shard."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        contiguous = {name: tensor.contiguous() for name, tensor in tensors.items()}
        save_file(contiguous, str(temporary), metadata={"fingerprint": fingerprint, "documents": json.dumps(doc_ids)})
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def read_manifest(directory: str | Path) -> dict:
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} has no {MANIFEST}: point at a directory written by `fm-indexer dump-labels`"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(
            f"{path} is not a version-{VERSION} {FORMAT} manifest (format={manifest.get('format')!r}, "
            f"version={manifest.get('version')!r}): dump the labels again with this version of fm-transformers"
        )
    return manifest


@dataclass(frozen=True)
class DocumentRef:
    """Where one document lives: its shard file and its key prefix inside it."""

    doc_id: str
    path: Path
    prefix: str
    tokens: int
    triggers: int
    chunks: int


class LabelShards:
    """A read-only view of a dump directory; opening it checks every shard against the manifest's backbone."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        self.backbone = self.manifest["backbone"]
        self.target_layers = list(self.manifest["target_layers"])
        self.documents: list[DocumentRef] = []
        for shard in self.manifest["shards"]:
            path = self.directory / shard["file"]
            self._check_shard(path)
            for entry in shard["documents"]:
                self.documents.append(
                    DocumentRef(
                        doc_id=entry["id"],
                        path=path,
                        prefix=entry["prefix"],
                        tokens=entry["tokens"],
                        triggers=entry["triggers"],
                        chunks=entry["chunks"],
                    )
                )
        if not self.documents:
            raise ValueError(f"{self.directory} lists no finished document: run (or resume) `fm-indexer dump-labels`")

    def _check_shard(self, path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"{path} is listed in the manifest but missing: dump the labels again")
        with safe_open(str(path), framework="pt") as shard:
            fingerprint = (shard.metadata() or {}).get("fingerprint")
        if fingerprint != self.backbone["fingerprint"]:
            raise ValueError(
                f"{path} was made from another backbone (fingerprint {fingerprint}) than its manifest names "
                f"({self.backbone['name_or_path']}, fingerprint {self.backbone['fingerprint']}): "
                f"keep each dump's shards in their own directory"
            )

    @property
    def compress_rate(self) -> int:
        return self.backbone["compress_rate"]

    @property
    def num_triggers(self) -> int:
        return sum(document.triggers for document in self.documents)

    def load(self, index: int) -> dict[str, torch.Tensor]:
        """All tensors of document `index`, keyed without the document prefix ("hidden/10", "labels/indptr"...)."""
        document = self.documents[index]
        with safe_open(str(document.path), framework="pt") as shard:
            return {
                name[len(document.prefix) :]: shard.get_tensor(name)
                for name in shard.keys()  # noqa: SIM118 (safe_open is not iterable)
                if name.startswith(document.prefix)
            }

    def check_same_backbone(self, other: "LabelShards") -> None:
        """Refuse to mix label sets of two backbones (e.g. training data and held-out data)."""
        if other.backbone["fingerprint"] != self.backbone["fingerprint"]:
            raise ValueError(
                f"{other.directory} was dumped from {other.backbone['name_or_path']} (fingerprint "
                f"{other.backbone['fingerprint']}) but {self.directory} from {self.backbone['name_or_path']} "
                f"(fingerprint {self.backbone['fingerprint']}): use label sets made from the same backbone"
            )
