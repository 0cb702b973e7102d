"""The device side of compressed chunks: the hot set (the resident ones and the fresh tail) and the device
history of indexer keys. The host side, every chunk, is cold_pool.ColdPool; the hot set is a cache of some of
its chunks on the device, rebuilt at each recall. Nothing here knows about models: entries are rows of `dim`
numbers, addressed by (sequence, chunk id).
"""

import contextlib
from collections.abc import Callable

import torch



def grown_capacity(needed: int, current: int) -> int:
    """Rows to allocate when a device buffer of `current` rows must hold `needed`: at least 1.5x, so a long
    prefill appending chunk after chunk copies what is stored O(log) times, not once per chunk."""
    return max(needed, current * 3 // 2)


class CapacityExceeded(RuntimeError):
    """A fixed-capacity device buffer was asked to hold more than it can: its owner must fix a larger one."""


class HotSet:
    """The device side of one CSA layer: resident chunks and the fresh tail in one slot table per kind.

    Table rows [0, resident_rows) hold the resident chunks of all sequences back to back, sequence b in rows
    offsets[b]:offsets[b+1], in chunk-id order. The tail follows, time-major: chunk tail_start + t of sequence
    b sits in row resident_rows + t * batch + b, so a new chunk of every sequence is appended in place (the
    table keeps `tail_reserve` chunks per sequence of room) and the kernels index the table as it is.
    The tail holds every chunk made since the last recall horizon, which no recall has judged yet.

    A recall builds the next table on `copy_stream` when there is one (a CUDA stream), overlapping the decode
    work queued meanwhile; the first use of the table makes the current stream wait for the copies.
    """

    def __init__(
        self,
        kinds: dict[str, int],
        batch_size: int,
        device: torch.device,
        dtype: torch.dtype,
        tail_reserve: int = 16,
        copy_stream: "torch.cuda.Stream | None" = None,
    ):
        self.kinds, self.device, self.dtype = dict(kinds), device, dtype
        self.tail_reserve, self.copy_stream = tail_reserve, copy_stream
        self.chunk_ids = [torch.empty(0, dtype=torch.long, device=device) for _ in range(batch_size)]
        self._tables = {kind: torch.empty(0, dim, dtype=dtype, device=device) for kind, dim in kinds.items()}
        self._used = dict.fromkeys(kinds, 0)  # rows in use per kind: resident rows + tail rows
        self.resident_rows = 0
        self.tail_start = 0
        self._ready: torch.cuda.Event | None = None  # the current stream waits on it before touching the tables
        self._in_flight: tuple[torch.cuda.Event, list[torch.Tensor]] | None = None  # last recall, host sources
        self._candidates: tuple[int, tuple[torch.Tensor, torch.Tensor]] | None = None  # (tail length, result)
        self.fixed_rows: int | None = None  # see fix_capacity
        # Host ranges read by the fetches so far, summed over kinds: a run of consecutive chunk ids of one
        # sequence is one contiguous range of a pool (counted once where it crosses a slab boundary), the copy
        # a copy engine would issue for it; the gather reads them all in one launch. On the device: no sync.
        self.fetched_ranges = torch.zeros((), dtype=torch.long, device=device)

    @property
    def batch_size(self) -> int:
        return len(self.chunk_ids)

    def table(self, kind: str) -> torch.Tensor:
        """(capacity, dim): the slot table `candidates()` indexes into; rows past the used ones are unset."""
        self._wait_for_recall()
        return self._tables[kind]

    def tail(self, kind: str) -> torch.Tensor:
        """(batch, tail_length, dim) view of the tail."""
        rows = self.table(kind)[self.resident_rows : self._used[kind]]
        return rows.view(-1, self.batch_size, self.kinds[kind]).transpose(0, 1)

    @property
    def tail_length(self) -> int:
        return (self._used[next(iter(self.kinds))] - self.resident_rows) // self.batch_size

    def append_tail(self, kind: str, entries: torch.Tensor) -> None:
        """entries: (batch, n, dim), the newest chunks of this kind, written in place after the tail."""
        rows = entries.shape[1] * self.batch_size
        table, used = self.table(kind), self._used[kind]
        if used + rows > table.shape[0]:
            self._refuse_growth(used + rows)
            capacity = grown_capacity(used + rows + self.tail_reserve * self.batch_size, table.shape[0])
            grown = table.new_empty(capacity, self.kinds[kind])
            grown[:used] = table[:used]
            self._tables[kind] = table = grown
        table[used : used + rows] = entries.transpose(0, 1).reshape(rows, self.kinds[kind])
        self._used[kind] = used + rows

    def recall(self, new_ids: list[torch.Tensor], horizon: int, fetch: Callable[..., list[torch.Tensor]]) -> int:
        """Make `new_ids[b]` (sorted ids < horizon) the resident set of sequence b; the tail keeps ids >= horizon.

        Chunks already on the device (resident or in the tail) are copied within it; only the others come
        from `fetch(kind, rows, ids, dst, dst_rows)`, the cold pool, which returns the host tensors it reads.
        Returns the number of chunks fetched.
        """
        self.finish()
        plan = self._plan(new_ids, horizon)
        kept_tail = max(self.tail_length - max(horizon - self.tail_start, 0), 0) * self.batch_size
        resident = plan["dst"].numel() + plan["missing_dst"].numel()
        capacity = resident + kept_tail + self.tail_reserve * self.batch_size
        tables = {kind: self._tables[kind].new_empty(capacity, dim) for kind, dim in self.kinds.items()}
        stream = self.copy_stream
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(self.device))
        host_sources = []
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for kind, new in tables.items():
                old, used = self._tables[kind], self._used[kind]
                new[plan["dst"]] = old[plan["src"]]
                new[resident : resident + kept_tail] = old[used - kept_tail : used]
                host_sources += fetch(kind, plan["missing_rows"], plan["missing_ids"], new, plan["missing_dst"])
        self.fetched_ranges += plan["missing_runs"] * len(self.kinds)
        if stream is not None:
            for tensor in [*self._tables.values(), *tables.values(), *plan.values()]:
                tensor.record_stream(stream)  # the allocator must not reuse them before the copies ran
            self._ready = torch.cuda.Event()
            self._ready.record(stream)
            self._in_flight = (self._ready, host_sources)
        if self.fixed_rows is not None and capacity > self.fixed_rows:
            self.fixed_rows = None  # outgrown: the new tables replace the fixed ones, whose owner must refix
        if self.fixed_rows is not None:
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                for kind, new in tables.items():  # the fixed tables are their readers' fixed addresses
                    self._tables[kind][: resident + kept_tail] = new[: resident + kept_tail]
            if stream is not None:
                self._ready.record(stream)
            tables = self._tables
        self._tables, self.chunk_ids = tables, [ids.to(self.device) for ids in new_ids]
        self._used = dict.fromkeys(self.kinds, resident + kept_tail)
        self.resident_rows = resident
        self.tail_start = max(horizon, self.tail_start)
        self._candidates = None
        return plan["missing_ids"].numel()

    def fix_capacity(self, rows: int | None) -> None:
        """Keep the tables at `rows` rows from now on (None: grow freely again): a recall copies its result into
        them and appending never reallocates, so a captured CUDA graph may hold their addresses. Appending past
        them raises `CapacityExceeded`; a recall that needs more room unfixes them (see `fixed_rows`)."""
        self.finish()
        self._wait_for_recall()
        if rows is not None:
            self._refuse_growth_below(rows)
            for kind, table in self._tables.items():
                fixed = table.new_zeros(rows, self.kinds[kind])
                fixed[: self._used[kind]] = table[: self._used[kind]]
                self._tables[kind] = fixed
        self.fixed_rows = rows

    def account_tail(self, count: int) -> None:
        """Count `count` chunks per sequence that a caller wrote in place after the tail (rows `tail_slot_rows`),
        as append_tail would have."""
        rows = count * self.batch_size
        self._refuse_growth(self._used[next(iter(self.kinds))] + rows)
        for kind in self.kinds:
            self._used[kind] += rows
        self._candidates = None

    def resident_table(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(slot_index, chunk_ids), both (batch, width) long, -1 padded: the resident chunks of each sequence
        (no tail) and their table rows."""
        counts = [ids.numel() for ids in self.chunk_ids]
        if max(counts, default=0) > width:
            raise CapacityExceeded(f"{max(counts)} resident chunks in a sequence, the table has {width} columns")
        slot_index = torch.full((self.batch_size, width), -1, dtype=torch.long, device=self.device)
        chunk_ids = torch.full_like(slot_index, -1)
        start = 0
        for row, ids in enumerate(self.chunk_ids):
            slot_index[row, : counts[row]] = torch.arange(start, start + counts[row], device=self.device)
            chunk_ids[row, : counts[row]] = ids
            start += counts[row]
        return slot_index, chunk_ids

    def _refuse_growth(self, rows: int) -> None:
        if self.fixed_rows is not None and rows > self.fixed_rows:
            raise CapacityExceeded(f"the hot set needs {rows} rows, its tables are fixed at {self.fixed_rows}")

    def _refuse_growth_below(self, rows: int) -> None:
        used = max(self._used.values(), default=0)
        if used > rows:
            raise CapacityExceeded(f"the hot set holds {used} rows, more than the {rows} asked for")

    def _plan(self, new_ids: list[torch.Tensor], horizon: int) -> dict[str, torch.Tensor]:
        """Where each new resident row comes from: table rows on the device (src -> dst) or the pool (missing).

        All sequences at once: (sequence, chunk id) pairs become one sorted key per row and old resident rows are
        found by one searchsorted; the two repeat_interleaves and the two final selections wait for the device
        (a loop over sequences waited several times per sequence, for every CSA layer at every refresh).
        """
        device, batch = self.device, self.batch_size
        counts = [ids.numel() for ids in new_ids]
        ids = torch.cat([ids.to(device) for ids in new_ids])  # one list per sequence: never empty
        rows = torch.repeat_interleave(torch.arange(batch, device=device), torch.tensor(counts, device=device))
        old_ids = torch.cat(self.chunk_ids)
        old_rows = torch.repeat_interleave(
            torch.arange(batch, device=device), torch.tensor([i.numel() for i in self.chunk_ids], device=device)
        )
        stride = max(horizon, self.tail_start + self.tail_length, 1)  # above every chunk id: keys sort by (row, id)
        old_keys, keys = old_rows * stride + old_ids, rows * stride + ids
        old_pos = torch.searchsorted(old_keys, keys).clamp(max=max(old_keys.numel() - 1, 0))  # = its table row
        in_old = old_keys[old_pos] == keys if old_keys.numel() else torch.zeros_like(ids, dtype=torch.bool)
        in_tail = ~in_old & (ids >= self.tail_start) & (ids < self.tail_start + self.tail_length)
        tail_rows = self.resident_rows + (ids - self.tail_start) * batch + rows
        slots = torch.arange(ids.numel(), device=device)
        missing = ~in_old & ~in_tail
        kept = (~missing).nonzero().squeeze(1)
        fetched = missing.nonzero().squeeze(1)
        fetched_keys = rows[fetched] * (stride + 1) + ids[fetched]  # ascending; consecutive ids differ by 1
        return {
            "src": torch.where(in_old, old_pos, tail_rows)[kept],
            "dst": slots[kept],
            "missing_rows": rows[fetched],
            "missing_ids": ids[fetched],
            "missing_dst": slots[fetched],
            "missing_runs": (fetched_keys.diff() != 1).sum() + (fetched_keys.numel() > 0),
        }

    def load_history(self, horizon: int, fetch: Callable[..., list[torch.Tensor]]) -> None:
        """Put every chunk below `horizon` back on the device, in the tail layout (tail_start 0), so a prefill
        that continues a sequence after decode reads the whole history in place: one fetch of what is not on
        the device, once per prefill, not per chunk."""
        if self.tail_start == 0:
            return
        everything = [torch.arange(horizon, device=self.device) for _ in range(self.batch_size)]
        self.recall(everything, horizon, fetch)
        self.finish()
        batch, resident = self.batch_size, self.resident_rows
        order = torch.arange(resident, device=self.device).view(batch, -1).t().reshape(-1)  # sequence-major -> time-major
        for kind in self.kinds:
            self._tables[kind][:resident] = self.table(kind)[order]
        self.chunk_ids = [ids[:0] for ids in self.chunk_ids]
        self.resident_rows, self.tail_start = 0, 0
        self._candidates = None

    def history(self, kind: str) -> torch.Tensor:
        """(chunks, batch, dim) view of every chunk of this kind; valid while the hot set holds the whole
        history in the tail layout (from the first entry until the first recall, or after load_history)."""
        if self.tail_start != 0 or self.resident_rows != 0:
            raise RuntimeError("the hot set holds a resident subset, not the whole history: call load_history first")
        return self.table(kind)[: self._used[kind]].view(-1, self.batch_size, self.kinds[kind])

    def resident_ids(self) -> list[torch.Tensor]:
        """Sorted chunk ids resident per sequence (the tail not included)."""
        return list(self.chunk_ids)

    def candidates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Level-2 candidates per sequence: resident chunks then the tail.

        Returns (slot_index, chunk_ids), both (batch, max_candidates) long and -1-padded. Slot indices
        address `table(kind)`.
        """
        tail_len = self.tail_length
        if self._candidates is not None and self._candidates[0] == tail_len:
            return self._candidates[1]
        counts = [ids.numel() + tail_len for ids in self.chunk_ids]
        width = max(counts, default=0)
        slot_index = torch.full((self.batch_size, width), -1, dtype=torch.long, device=self.device)
        chunk_ids = torch.full_like(slot_index, -1)
        offsets = self._offsets()
        tail_steps = torch.arange(tail_len, device=self.device)
        for row, ids in enumerate(self.chunk_ids):
            resident = ids.numel()
            slot_index[row, :resident] = torch.arange(int(offsets[row]), int(offsets[row + 1]), device=self.device)
            slot_index[row, resident : resident + tail_len] = self.resident_rows + tail_steps * self.batch_size + row
            chunk_ids[row, :resident] = ids
            chunk_ids[row, resident : resident + tail_len] = self.tail_start + tail_steps
        self._candidates = (tail_len, (slot_index, chunk_ids))
        return slot_index, chunk_ids

    def resident_count(self) -> int:
        """Chunks on the device for all sequences, tail included."""
        return self.resident_rows + self.batch_size * self.tail_length

    def device_bytes(self, kind: str) -> tuple[int, int]:
        """(resident, tail) bytes of the rows holding chunks of this kind, measured from the table."""
        table = self._tables[kind]
        return table[: self.resident_rows].nbytes, table[self.resident_rows : self._used[kind]].nbytes

    def spare_bytes(self) -> int:
        """Bytes of table rows allocated as room for the tail but not holding a chunk yet."""
        return sum(table[self._used[kind] :].nbytes for kind, table in self._tables.items())

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep sequence rows[i] as row i (beam search); the batch size may change."""
        offsets, picked, tail_len = self._offsets(), [int(row) for row in rows.tolist()], self.tail_length
        rows = rows.to(self.device)
        for kind, dim in self.kinds.items():
            pieces = [self.table(kind)[int(offsets[row]) : int(offsets[row + 1])] for row in picked]
            tail = self.tail(kind).index_select(0, rows).transpose(0, 1).reshape(-1, dim)
            room = self._tables[kind].new_empty(self.tail_reserve * len(picked), dim)
            self._tables[kind] = torch.cat([*pieces, tail, room])
        self.chunk_ids = [self.chunk_ids[row] for row in picked]
        self.resident_rows = sum(ids.numel() for ids in self.chunk_ids)
        self._used = dict.fromkeys(self.kinds, self.resident_rows + len(picked) * tail_len)
        self._candidates = None

    def finish(self) -> None:
        """Block until the last recall's copies are done and release the host memory they read."""
        if self._in_flight is not None:
            self._in_flight[0].synchronize()
            self._in_flight = None

    def _wait_for_recall(self) -> None:
        if self._ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self._ready)
            self._ready = None

    def _offsets(self) -> torch.Tensor:
        counts = torch.tensor([0] + [ids.numel() for ids in self.chunk_ids])
        return counts.cumsum(0)


class DeviceHistory:
    """Every entry of one kind on the device, (batch, length, dim), grown by `grown_capacity`. Holds the native
    indexer keys of target and refresh layers, which level 1 and the refresh score in full."""

    def __init__(self, batch_size: int, dim: int, device: torch.device, dtype: torch.dtype):
        self._buffer = torch.empty(batch_size, 0, dim, device=device, dtype=dtype)
        self.length = 0
        self.fixed = False

    @property
    def buffer(self) -> torch.Tensor:
        """(batch, capacity, dim): the whole buffer, entries then room."""
        return self._buffer

    def fix_capacity(self, capacity: int | None) -> None:
        """Hold `capacity` entries per sequence from now on without reallocating (None: grow freely again)."""
        if capacity is not None:
            if capacity < self.length:
                raise CapacityExceeded(f"the history holds {self.length} entries, more than the {capacity} asked for")
            fixed = self._buffer.new_zeros(self._buffer.shape[0], capacity, self._buffer.shape[2])
            fixed[:, : self.length] = self.entries
            self._buffer = fixed
        self.fixed = capacity is not None

    def account(self, count: int) -> None:
        """Count `count` entries that a caller wrote in place after the stored ones."""
        if self.length + count > self._buffer.shape[1]:
            raise CapacityExceeded(f"the history needs {self.length + count} entries, it holds {self._buffer.shape[1]}")
        self.length += count

    @property
    def entries(self) -> torch.Tensor:
        """(batch, length, dim) view of the stored entries."""
        return self._buffer[:, : self.length]

    def append(self, entries: torch.Tensor) -> None:
        """entries: (batch, n, dim)."""
        count = entries.shape[1]
        if self.length + count > self._buffer.shape[1]:
            if self.fixed:
                raise CapacityExceeded(f"the history needs {self.length + count} entries, it is fixed at {self._buffer.shape[1]}")
            capacity = grown_capacity(self.length + count, self._buffer.shape[1])
            grown = self._buffer.new_empty(self._buffer.shape[0], capacity, self._buffer.shape[2])
            grown[:, : self.length] = self.entries
            self._buffer = grown
        self._buffer[:, self.length : self.length + count] = entries
        self.length += count

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep sequence rows[i] as row i (beam search); the batch size may change."""
        self._buffer = self.entries.index_select(0, rows.to(self._buffer.device))

    def nbytes(self) -> int:
        """Bytes of the stored entries (the buffer's spare room is counted by `spare_bytes`)."""
        return self.entries.nbytes

    def spare_bytes(self) -> int:
        return self._buffer.nbytes - self.entries.nbytes
