"""Writing label shards of bounded size: short documents are packed together, long ones cut into parts.

A 512K-token document at DeepSeek-V4-Flash sizes is about half a gigabyte of labels; packed 16 to a file it would
make files of gigabytes, and a reader would need all of one in memory. Here every file stays near `shard_bytes`:
documents are packed until the next would pass it (or `docs_per_shard` is reached), and a document larger than
`shard_bytes` is cut, between trigger steps, into parts of at most that size, each in a file of its own (a
single trigger step, with the keys it first sees, is the smallest part, so one can exceed the budget alone).
The manifest lists a document only once all its parts are renamed into place (see shards.py), so an interrupted
dump resumes at the first document it does not list, with an empty pack, and writes the same files as a run that
was never interrupted.
"""

import math
from pathlib import Path

import torch

from .labels import visible_chunks
from .shards import MANIFEST, atomic_write_json, write_shard

ROW_NAMES = ("positions",)  # besides hidden/{layer}: one entry per trigger step
CSR_NAMES = ("labels", "used", "votes")  # "votes" only in dumps that store it (dump.py)


class ShardWriter:
    """Appends documents to a dump directory; `close` writes the last pack. Updates `manifest` in place."""

    def __init__(self, directory: Path, manifest: dict, shard_bytes: int, docs_per_shard: int):
        if shard_bytes < 1 or docs_per_shard < 1:
            raise ValueError(f"shard_bytes and docs_per_shard must be positive, got {shard_bytes} and {docs_per_shard}")
        self.directory = directory
        self.manifest = manifest
        self.shard_bytes = shard_bytes
        self.docs_per_shard = docs_per_shard
        self._pack: list[tuple[str, int, dict]] = []  # (doc_id, tokens, tensors) waiting for their file

    def add(self, doc_id: str, tokens: int, tensors: dict[str, torch.Tensor]) -> None:
        size = _bytes(tensors)
        if size > self.shard_bytes:
            self._flush()
            rate = self.manifest["backbone"]["compress_rate"]
            parts = split_document(tensors, self.shard_bytes, rate)
            self._write([(doc_id, tokens, tensors, part) for part in parts])
            return
        if sum(_bytes(packed) for _, _, packed in self._pack) + size > self.shard_bytes:
            self._flush()
        self._pack.append((doc_id, tokens, tensors))
        if len(self._pack) == self.docs_per_shard:
            self._flush()

    def close(self) -> None:
        self._flush()

    def _flush(self) -> None:
        if self._pack:
            whole = [(doc_id, tokens, tensors, None) for doc_id, tokens, tensors in self._pack]
            self._pack = []
            self._write(whole, one_file=True)

    def _write(self, items: list, one_file: bool = False) -> None:
        """Write `items` (one file for all, or one file each), then list them in the manifest."""
        groups = [items] if one_file else [[item] for item in items]
        listed = []
        for group in groups:
            name = f"shard-{len(self.manifest['shards']) + len(listed):05d}.safetensors"
            tensors, entries = {}, []
            for position, (doc_id, tokens, document, part) in enumerate(group):
                rows, chunk_rows = part or ((0, _triggers(document)), (0, _chunks(document)))
                prefix = f"{position}/"
                tensors.update({prefix + key: value for key, value in cut(document, rows, chunk_rows).items()})
                entries.append(
                    {
                        "id": doc_id,
                        "prefix": prefix,
                        "tokens": tokens,
                        "triggers": _triggers(document),
                        "chunks": _chunks(document),
                        "rows": list(rows),
                        "chunk_rows": list(chunk_rows),
                    }
                )
            fingerprint = self.manifest["backbone"]["fingerprint"]
            write_shard(self.directory / name, tensors, fingerprint, [entry["id"] for entry in entries])
            listed.append({"file": name, "documents": entries})
        self.manifest["shards"].extend(listed)
        atomic_write_json(self.directory / MANIFEST, self.manifest)


def split_document(
    tensors: dict[str, torch.Tensor], budget: int, compress_rate: int
) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(rows, chunk_rows) of parts of at most `budget` bytes each (but at least one trigger step each).

    A part's chunks are those that first become visible at its triggers; the last part takes the rest.
    """
    visible = visible_chunks(tensors["positions"], compress_rate).clamp(max=_chunks(tensors))
    new_chunks = torch.diff(visible, prepend=visible.new_zeros(1))
    row_cost = _row_bytes(tensors) + new_chunks * _key_row_bytes(tensors)
    row_cost[-1] += (_chunks(tensors) - int(visible[-1])) * _key_row_bytes(tensors)  # the rest go with the last part
    cost = torch.cumsum(row_cost, 0)  # bytes through each row
    budget = max(1, budget - _part_overhead(tensors))
    parts, start, spent = [], 0, 0
    while start < cost.numel():
        end = max(start + 1, int(torch.searchsorted(cost, spent + budget, right=True)))
        parts.append((start, end))
        spent, start = int(cost[end - 1]), end
    chunk_ends = [int(visible[end - 1]) for _, end in parts[:-1]] + [_chunks(tensors)]
    return [(rows, (first, end)) for rows, first, end in zip(parts, [0] + chunk_ends[:-1], chunk_ends, strict=True)]


def cut(tensors: dict[str, torch.Tensor], rows: tuple[int, int], chunk_rows: tuple[int, int]) -> dict:
    """The tensors of one part: trigger rows `rows`, CSR sets rebased to start at 0, key rows `chunk_rows`."""
    first, end = rows
    part = {}
    for name, tensor in tensors.items():
        kind, _, _ = name.partition("/")
        if kind == "keys":
            part[name] = tensor[chunk_rows[0] : chunk_rows[1]]
        elif kind in CSR_NAMES:
            indptr = tensors[f"{kind}/indptr"]
            if name.endswith("/indptr"):
                part[name] = indptr[first : end + 1] - indptr[first]
            else:
                part[name] = tensor[int(indptr[first]) : int(indptr[end])]
        else:  # hidden/{layer}, positions
            part[name] = tensor[first:end]
    return part


def _bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())


def _triggers(tensors: dict) -> int:
    return int(tensors["positions"].numel())


def _chunks(tensors: dict) -> int:
    return int(next(tensor.shape[0] for name, tensor in tensors.items() if name.startswith("keys/")))


def _entry_bytes(tensor: torch.Tensor) -> int:
    """Bytes of one entry along the first dimension (one trigger row, one chunk, one CSR entry)."""
    return math.prod(tensor.shape[1:]) * tensor.element_size()


def _key_row_bytes(tensors: dict) -> int:
    return sum(_entry_bytes(tensor) for name, tensor in tensors.items() if name.startswith("keys/"))


def _csr_kinds(tensors: dict) -> list[str]:
    return [kind for kind in CSR_NAMES if f"{kind}/indptr" in tensors]


def _part_overhead(tensors: dict) -> int:
    """Bytes a part holds beyond its rows: each CSR pointer array has one entry more than the part's rows."""
    return sum(tensors[f"{kind}/indptr"].element_size() for kind in _csr_kinds(tensors))


def _row_bytes(tensors: dict) -> torch.Tensor:
    """(triggers,) bytes of each trigger row: hidden states, position, pointer and its CSR entries."""
    row = sum(_entry_bytes(t) for name, t in tensors.items() if name.startswith("hidden/") or name in ROW_NAMES)
    total = torch.full((_triggers(tensors),), row, dtype=torch.long)
    for kind in _csr_kinds(tensors):
        lengths = torch.diff(tensors[f"{kind}/indptr"])
        entry = sum(_entry_bytes(t) for name, t in tensors.items() if name in (f"{kind}/indices", f"{kind}/counts"))
        total += lengths * entry + tensors[f"{kind}/indptr"].element_size()
    return total
