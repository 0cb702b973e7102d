"""The on-disk label dataset: safetensors shards of document parts plus one JSON manifest.

A directory holds `manifest.json` and `shard-NNNNN.safetensors` files. A document is stored as one or more
parts, each a contiguous range of its trigger steps (shard_writer.py cuts long documents so that no file grows
with the document). Per part a shard stores
    {part}/hidden/{layer}   (triggers, hidden)      hidden state entering each target layer's attention
    {part}/keys/{layer}     (chunks, index_head_dim) that layer's frozen native indexer keys, the chunks of the
                                                    part's range (the document's keys are the parts' keys in order)
    {part}/positions        (triggers,)             token position of each trigger step
    {part}/labels/indptr, {part}/labels/indices     CSR golden positives (lookahead union) per trigger
    {part}/used/indptr, {part}/used/indices, {part}/used/counts
                                                   CSR chunks the native top-k picked in the window, with how
                                                   many (token, CSA layer) picks each got
    {part}/votes/indptr, {part}/votes/indices, {part}/votes/counts
                                                   CSR chunks in the nucleus of at least one CSA layer at a token
                                                   of the window, with the most layers that kept each at one token
                                                   (uint8): the labels at any vote (absent from older dumps)
A part's keys are the chunks that first become visible at its triggers (the last part also holds the chunks no
trigger sees), so a trigger of part p reads the keys of parts 0..p. The manifest names the backbone (name,
dimensions, and a fingerprint of its weights) and the label settings; every shard repeats the fingerprint, so a
shard from another backbone is refused wherever it turns up.
Invariant: every file in the directory is complete, and every document the manifest lists is whole. Writes go
to a temporary name and are renamed into place, and a document is listed only after all its parts are.
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
VERSION = 2  # 2: documents in parts (trigger ranges); version 1 held whole documents
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
class PartRef:
    """One part of a document: its file, its key prefix there, and the document rows it holds."""

    path: Path
    prefix: str
    rows: tuple[int, int]  # trigger steps [first, end) of the document
    chunk_rows: tuple[int, int]  # key rows [first, end) of the document

    @property
    def triggers(self) -> int:
        return self.rows[1] - self.rows[0]


@dataclass(frozen=True)
class DocumentRef:
    """Where one document lives: its parts, in trigger order."""

    doc_id: str
    tokens: int
    triggers: int
    chunks: int
    parts: tuple[PartRef, ...]


class LabelShards:
    """A read-only view of a dump directory; opening it checks every shard against the manifest's backbone.

    Nothing but the manifest is read up front: tensors are read per part (`load_part`, what training streams)
    or per document (`load`), so memory follows the part, not the dataset.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        self.backbone = self.manifest["backbone"]
        self.target_layers = list(self.manifest["target_layers"])
        entries: dict[str, list[tuple[dict, PartRef]]] = {}
        for shard in self.manifest["shards"]:
            path = self.directory / shard["file"]
            self._check_shard(path)
            for entry in shard["documents"]:
                part = PartRef(path, entry["prefix"], tuple(entry["rows"]), tuple(entry["chunk_rows"]))
                entries.setdefault(entry["id"], []).append((entry, part))
        self.documents = [_document(doc_id, listed, self.directory) for doc_id, listed in entries.items()]
        if not self.documents:
            raise ValueError(f"{self.directory} lists no finished document: run (or resume) `fm-indexer dump-labels`")
        # The units training streams: (document index, part index), in manifest order.
        self.parts = [(doc, part) for doc, document in enumerate(self.documents) for part in range(len(document.parts))]
        self._headers: dict[Path, tuple[int, dict]] = {}  # shard -> (first data byte, safetensors header)

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

    def part_triggers(self) -> list[int]:
        """Trigger steps of each entry of `parts`."""
        return [self.documents[doc].parts[part].triggers for doc, part in self.parts]

    def load(self, index: int) -> dict[str, torch.Tensor]:
        """All tensors of document `index`, keyed without the part prefix ("hidden/10", "labels/indptr"...)."""
        parts = [_read(part) for part in self.documents[index].parts]
        return {name: _join(name, [part[name] for part in parts]) for name in parts[0]}

    def load_part(
        self, doc: int, part: int, names: list[str] | None = None, pin_memory: bool = False
    ) -> dict[str, torch.Tensor]:
        """The tensors `names` (default: all) of one part, CSR pointers from 0; "keys/*" are the document's keys
        up to the part's last chunk (parts 0..part), which is every chunk its triggers can see.

        Every tensor is a view into one host buffer (pinned with `pin_memory`) that the stored bytes are read into
        directly, the keys of parts 0..part laid end to end: one pass over the bytes, no safetensors copy, no
        concatenation, and one transfer moves the whole part to a GPU (staging.py)."""
        return self.load_parts([(doc, part)], names, pin_memory)

    def read_part(self, part: int, names: list[str] | None = None, pin_memory: bool = False) -> dict[str, torch.Tensor]:
        """load_part of entry `part` of `parts`: what the loaders read (read_groups.ReadGroups reads groups)."""
        doc, index = self.parts[part]
        return self.load_part(doc, index, names, pin_memory=pin_memory)

    def load_parts(
        self, refs: list[tuple[int, int]], names: list[str] | None = None, pin_memory: bool = False
    ) -> dict[str, torch.Tensor]:
        """Several parts (document, part) read as one, laid end to end in one host buffer as load_part lays one.

        Chunk ids stay those of each part's document: with more than one part, "key_base" (triggers,) int64 says
        where each trigger step's own keys start in the joined "keys/*", and the CSR pointers are joined to follow
        on (those two are small tensors of their own, outside the buffer)."""
        first = self.documents[refs[0][0]].parts[refs[0][1]]
        names = names if names is not None else _names(first)

        def pieces(name: str) -> list[StoredTensor]:
            found = []
            for doc, part in refs:
                parts = self.documents[doc].parts
                read = parts[: part + 1] if name.startswith("keys/") else parts[part : part + 1]
                found += [self._locate(ref, name) for ref in read]
            return found

        data = read_into_one_buffer([(name, pieces(name)) for name in names], pin_memory)
        if len(refs) == 1:
            return data
        triggers = [self.documents[doc].parts[part].triggers for doc, part in refs]
        for name in [name for name in data if name.endswith("/indptr")]:
            data[name] = _join(name, list(torch.split(data[name], [count + 1 for count in triggers])))
        keys = [self.documents[doc].parts[part].chunk_rows[1] for doc, part in refs]  # parts 0..part: from chunk 0
        starts = torch.tensor([0, *keys[:-1]]).cumsum(0)
        data["key_base"] = torch.repeat_interleave(starts, torch.tensor(triggers))
        return data

    def _locate(self, part: PartRef, name: str) -> "StoredTensor":
        if part.path not in self._headers:
            self._headers[part.path] = read_header(part.path)
        start, header = self._headers[part.path]
        entry = header[part.prefix + name]
        first, end = entry["data_offsets"]
        return StoredTensor(part.path, start + first, end - first, _DTYPES[entry["dtype"]], tuple(entry["shape"]))

    def check_same_backbone(self, other: "LabelShards") -> None:
        """Refuse to mix label sets of two backbones (e.g. training data and held-out data)."""
        if other.backbone["fingerprint"] != self.backbone["fingerprint"]:
            raise ValueError(
                f"{other.directory} was dumped from {other.backbone['name_or_path']} (fingerprint "
                f"{other.backbone['fingerprint']}) but {self.directory} from {self.backbone['name_or_path']} "
                f"(fingerprint {self.backbone['fingerprint']}): use label sets made from the same backbone"
            )


_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_ALIGN = 64  # bytes; each tensor's view starts at a multiple, whatever its dtype


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes lie in a safetensors file."""

    path: Path
    offset: int  # from the start of the file
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def read_header(path: Path) -> tuple[int, dict]:
    """(offset of the first data byte, header) of a safetensors file: an 8-byte little-endian length, then JSON."""
    with open(path, "rb") as file:
        length = int.from_bytes(file.read(8), "little")
        return 8 + length, json.loads(file.read(length))


def read_into_one_buffer(
    spans: list[tuple[str, list[StoredTensor]]], pin_memory: bool = False
) -> dict[str, torch.Tensor]:
    """name -> the concatenation (along dim 0) of its stored pieces, each a view into one new host buffer."""
    layout, size = [], 0
    for name, pieces in spans:
        layout.append((name, size, pieces))
        size += -(-sum(piece.nbytes for piece in pieces) // _ALIGN) * _ALIGN
    buffer = torch.empty(max(size, 1), dtype=torch.uint8, pin_memory=pin_memory)
    memory = memoryview(buffer.numpy())
    tensors, files = {}, {}
    try:
        for name, start, pieces in layout:
            position = start
            for piece in pieces:
                file = files.get(piece.path) or files.setdefault(piece.path, open(piece.path, "rb"))  # noqa: SIM115
                file.seek(piece.offset)
                if file.readinto(memory[position : position + piece.nbytes]) != piece.nbytes:
                    raise OSError(f"{piece.path} ends before the {piece.nbytes} bytes of {name!r} it lists")
                position += piece.nbytes
            rows = sum(piece.shape[0] for piece in pieces)
            shape = (rows, *pieces[0].shape[1:]) if pieces[0].shape else ()
            tensors[name] = buffer[start:position].view(pieces[0].dtype).view(shape)
    finally:
        for file in files.values():
            file.close()
    return tensors


def _document(doc_id: str, listed: list[tuple[dict, PartRef]], directory: Path) -> DocumentRef:
    """A document from its manifest entries, checked to cover its triggers and chunks without gap or overlap."""
    first = listed[0][0]
    parts = tuple(part for _, part in listed)
    rows = [part.rows for part in parts]
    chunk_rows = [part.chunk_rows for part in parts]
    if not (_covers(rows, first["triggers"]) and _covers(chunk_rows, first["chunks"])):
        raise ValueError(
            f"{directory / MANIFEST} lists parts of {doc_id!r} that do not cover it once (triggers {rows}, chunks "
            f"{chunk_rows}): the manifest was edited or mixed from two dumps; dump the labels again"
        )
    return DocumentRef(doc_id, first["tokens"], first["triggers"], first["chunks"], parts)


def _covers(ranges: list[tuple[int, int]], total: int) -> bool:
    ends = [0] + [end for _, end in ranges]
    return all(start == end for (start, _), end in zip(ranges, ends, strict=False)) and ends[-1] == total


def _names(part: PartRef) -> list[str]:
    with safe_open(str(part.path), framework="pt") as shard:
        return [name[len(part.prefix) :] for name in shard.keys() if name.startswith(part.prefix)]  # noqa: SIM118


def _read(part: PartRef) -> dict[str, torch.Tensor]:
    """Every tensor of one part, through safetensors (whole documents; load_part reads parts its own way)."""
    with safe_open(str(part.path), framework="pt") as shard:
        return {name: shard.get_tensor(part.prefix + name) for name in _names(part)}


def _join(name: str, pieces: list[torch.Tensor]) -> torch.Tensor:
    """One document tensor from its parts' pieces; CSR pointers are shifted to follow on."""
    if not name.endswith("/indptr"):
        return torch.cat(pieces)
    joined, offset = [pieces[0]], pieces[0][-1]
    for piece in pieces[1:]:
        joined.append(piece[1:] + offset)
        offset = offset + piece[-1]
    return torch.cat(joined)
