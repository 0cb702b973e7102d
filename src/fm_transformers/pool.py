"""Where compressed chunks live: the host cold pool (all of them) and the device hot set (the resident ones).

Invariant: the cold pool always holds every compressed entry ever made, in order, so it equals what the
stock cache would hold. The hot set is a cache of some of them on the device, rebuilt at each recall.
Nothing here knows about models: entries are rows of `dim` numbers, addressed by (sequence, chunk id).
"""

from collections.abc import Callable

import torch


class ColdPool:
    """Host storage of one kind of entry for one layer and every sequence of a batch.

    It grows by slabs of `slab_chunks` entries, so appending never copies what is already stored. Slabs are
    pinned when the model runs on CUDA, so chunks can be read by the GPU or copied asynchronously.
    """

    def __init__(self, batch_size: int, dim: int, dtype: torch.dtype, pin_memory: bool, slab_chunks: int = 1024):
        self.batch_size, self.dim, self.dtype = batch_size, dim, dtype
        self.pin_memory, self.slab_chunks = pin_memory, slab_chunks
        self.slabs: list[torch.Tensor] = []  # each (batch, slab_chunks, dim)
        self.length = 0

    def append(self, entries: torch.Tensor) -> None:
        """entries: (batch, n, dim) on any device; copied to host, converted to the pool dtype."""
        written = 0
        count = entries.shape[1]
        while written < count:
            slab, offset = divmod(self.length, self.slab_chunks)
            if slab == len(self.slabs):
                self.slabs.append(
                    torch.empty(self.batch_size, self.slab_chunks, self.dim, dtype=self.dtype, pin_memory=self.pin_memory)
                )
            take = min(count - written, self.slab_chunks - offset)
            self.slabs[slab][:, offset : offset + take].copy_(entries[:, written : written + take])
            written += take
            self.length += take

    def gather(self, row: int, chunk_ids: torch.Tensor) -> torch.Tensor:
        """(n, dim) host tensor with the entries of sequence `row` at `chunk_ids`."""
        chunk_ids = chunk_ids.cpu()
        if chunk_ids.numel() and int(chunk_ids.max()) >= self.length:
            raise IndexError(f"chunk {int(chunk_ids.max())} requested, the pool holds {self.length}")
        out = torch.empty(chunk_ids.numel(), self.dim, dtype=self.dtype)
        slab_of, offset = chunk_ids // self.slab_chunks, chunk_ids % self.slab_chunks
        for slab in slab_of.unique().tolist():
            where = slab_of == slab
            out[where] = self.slabs[slab][row, offset[where]]
        return out

    def read(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """(batch, stop - start, dim): a contiguous copy of a range, for every sequence."""
        stop = self.length if stop is None else stop
        parts = []
        for slab in range(start // self.slab_chunks, (stop + self.slab_chunks - 1) // self.slab_chunks):
            base = slab * self.slab_chunks
            lo, hi = max(start, base) - base, min(stop, base + self.slab_chunks) - base
            parts.append(self.slabs[slab][:, lo:hi])
        if not parts:
            return torch.empty(self.batch_size, 0, self.dim, dtype=self.dtype)
        return torch.cat(parts, dim=1)

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep sequence rows[i] as row i (beam search); the batch size may change."""
        rows = rows.cpu()
        self.slabs = [slab.index_select(0, rows) for slab in self.slabs]
        if self.pin_memory:
            self.slabs = [slab.pin_memory() for slab in self.slabs]
        self.batch_size = rows.numel()

    def allocated_bytes(self) -> int:
        return sum(slab.untyped_storage().nbytes() for slab in self.slabs)

    def used_bytes(self) -> int:
        return self.batch_size * self.length * self.dim * self.dtype.itemsize


class HotSet:
    """The device side of one CSA layer: resident chunks in flat slot tables plus the fresh tail.

    Resident chunks of all sequences sit back to back in one (slots, dim) table per kind, sequence b in
    rows offsets[b]:offsets[b+1], in chunk-id order. The tail holds every chunk made since the last recall
    horizon (ids tail_start.. for all sequences), which the next recall has not judged yet.
    """

    def __init__(self, kinds: dict[str, int], batch_size: int, device: torch.device, dtype: torch.dtype):
        self.kinds, self.device, self.dtype = dict(kinds), device, dtype
        self.chunk_ids = [torch.empty(0, dtype=torch.long, device=device) for _ in range(batch_size)]
        self.slots = {kind: torch.empty(0, dim, dtype=dtype, device=device) for kind, dim in kinds.items()}
        self.tail = {kind: torch.empty(batch_size, 0, dim, dtype=dtype, device=device) for kind, dim in kinds.items()}
        self.tail_start = 0
        self._candidates: tuple[int, tuple[torch.Tensor, torch.Tensor]] | None = None  # (tail length, result)

    @property
    def batch_size(self) -> int:
        return len(self.chunk_ids)

    def append_tail(self, kind: str, entries: torch.Tensor) -> None:
        """entries: (batch, n, dim), the newest chunks of this kind."""
        self.tail[kind] = torch.cat([self.tail[kind], entries.to(self.dtype)], dim=1)

    def rebuild(self, new_ids: list[torch.Tensor], horizon: int, fetch: Callable[[str, int, torch.Tensor], torch.Tensor]) -> int:
        """Make `new_ids[b]` (sorted ids < horizon) the resident set of sequence b; the tail keeps ids >= horizon.

        Chunks already on the device (resident or in the tail) are moved there; the others come from
        `fetch(kind, row, ids)`, the cold pool. Returns the number of chunks fetched.
        """
        fetched = 0
        old_offsets = self._offsets()
        new_slots = {kind: [] for kind in self.kinds}
        placed_ids = []
        for row, ids in enumerate(new_ids):
            ids = ids.to(self.device)
            old_ids = self.chunk_ids[row]
            old_pos = torch.searchsorted(old_ids, ids).clamp(max=max(old_ids.numel() - 1, 0))
            in_old = (old_pos < old_ids.numel()) & (old_ids[old_pos] == ids) if old_ids.numel() else torch.zeros_like(ids, dtype=torch.bool)
            in_tail = ~in_old & (ids >= self.tail_start)
            missing = ~in_old & ~in_tail
            fetched += int(missing.sum())
            base = int(old_offsets[row])
            for kind in self.kinds:
                rows = torch.empty(ids.numel(), self.kinds[kind], dtype=self.dtype, device=self.device)
                rows[in_old] = self.slots[kind][base + old_pos[in_old]]
                rows[in_tail] = self.tail[kind][row, ids[in_tail] - self.tail_start]
                if missing.any():
                    rows[missing] = fetch(kind, row, ids[missing]).to(self.device, self.dtype)
                new_slots[kind].append(rows)
            placed_ids.append(ids)
        self.chunk_ids = placed_ids
        for kind in self.kinds:
            self.slots[kind] = torch.cat(new_slots[kind]) if new_slots[kind] else self.slots[kind][:0]
            self.tail[kind] = self.tail[kind][:, max(horizon - self.tail_start, 0) :].clone()
        self.tail_start = max(horizon, self.tail_start)
        self._candidates = None
        return fetched

    def candidates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Level-2 candidates per sequence: resident chunks then the tail.

        Returns (slot_index, chunk_ids), both (batch, max_candidates) long and -1-padded. Slot indices
        address `stacked(kind)`: the slot table followed by the tail rows, sequence by sequence.
        """
        tail_len = self.tail_length
        if self._candidates is not None and self._candidates[0] == tail_len:
            return self._candidates[1]
        counts = [ids.numel() + tail_len for ids in self.chunk_ids]
        width = max(counts, default=0)
        slot_index = torch.full((self.batch_size, width), -1, dtype=torch.long, device=self.device)
        chunk_ids = torch.full_like(slot_index, -1)
        offsets = self._offsets()
        total_slots = int(offsets[-1])
        tail_ids = torch.arange(self.tail_start, self.tail_start + tail_len, device=self.device)
        for row, ids in enumerate(self.chunk_ids):
            resident = ids.numel()
            slot_index[row, :resident] = torch.arange(int(offsets[row]), int(offsets[row + 1]), device=self.device)
            slot_index[row, resident : resident + tail_len] = total_slots + row * tail_len + torch.arange(tail_len, device=self.device)
            chunk_ids[row, :resident] = ids
            chunk_ids[row, resident : resident + tail_len] = tail_ids
        self._candidates = (tail_len, (slot_index, chunk_ids))
        return slot_index, chunk_ids

    def stacked(self, kind: str) -> torch.Tensor:
        """(slots + batch * tail, dim): the table `candidates()` indexes into."""
        return torch.cat([self.slots[kind], self.tail[kind].reshape(-1, self.kinds[kind])])

    @property
    def tail_length(self) -> int:
        return next(iter(self.tail.values())).shape[1]

    def resident_count(self) -> int:
        """Chunks on the device for all sequences, tail included."""
        return sum(ids.numel() for ids in self.chunk_ids) + self.batch_size * self.tail_length

    def device_bytes(self, kind: str) -> int:
        """Bytes of this kind on the device, measured from the tensors that hold them."""
        return self.slots[kind].nbytes + self.tail[kind].nbytes

    def reorder(self, rows: torch.Tensor) -> None:
        offsets = self._offsets()
        picked = [int(row) for row in rows.tolist()]
        for kind in self.kinds:
            pieces = [self.slots[kind][int(offsets[row]) : int(offsets[row + 1])] for row in picked]
            self.slots[kind] = torch.cat(pieces) if pieces else self.slots[kind][:0]
            self.tail[kind] = self.tail[kind].index_select(0, rows.to(self.device))
        self.chunk_ids = [self.chunk_ids[row] for row in picked]
        self._candidates = None

    def _offsets(self) -> torch.Tensor:
        counts = torch.tensor([0] + [ids.numel() for ids in self.chunk_ids])
        return counts.cumsum(0)
