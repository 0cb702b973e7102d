"""Moving the parts a run is about to train on to the device, ahead of use and in bounded number.

One background thread reads each part from its shard straight into one pinned host buffer and copies that buffer
to the device on a side stream, one transfer a part; the training stream waits on an event only when it
first touches the part, so reading and copying overlap the steps before. At most `prefetch` parts are in
flight, and the caller drops a part once no batch needs it, so memory follows the part size and `prefetch`,
never the number of documents.
"""

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch.profiler import record_function

from .labels import visible_chunks
from .shards import LabelShards


@dataclass
class StagedPart:
    """A part on the device; `host` keeps the small tensors the host plans batches with."""

    part: int  # index into the loader's parts (LabelShards.parts, or ReadGroups.parts)
    order_position: int
    device: dict[str, torch.Tensor]  # hidden/{layer}, keys/{layer}, positions, visible, labels/*, rows[, key_base]
    host: dict[str, torch.Tensor]  # labels/indptr, visible, rows
    ready: torch.cuda.Event | None  # recorded on the side stream after the copies (None on the CPU)

    def wait(self) -> None:
        """Make the current stream wait for the copies, and keep the memory from reuse while it works on it."""
        if self.ready is None:
            return
        stream = torch.cuda.current_stream(self.device["rows"].device)
        stream.wait_event(self.ready)
        for tensor in self.device.values():
            tensor.record_stream(stream)
        self.ready = None


def tensor_names(layers: list[int]) -> list[str]:
    """What training reads of a part: no `used/*` (evaluation only)."""
    per_layer = [f"{kind}/{layer}" for layer in layers for kind in ("hidden", "keys")]
    return [*per_layer, "positions", "labels/indptr", "labels/indices"]


class PartStager:
    """Stages parts in the order they are asked for, `prefetch` ahead; `close` stops the thread."""

    def __init__(self, shards: LabelShards, layers: list[int], device: torch.device, prefetch: int = 2):
        if prefetch < 1:
            raise ValueError(f"prefetch must be at least 1 part, got {prefetch}")
        self.shards, self.names, self.device, self.prefetch = shards, tensor_names(layers), device, prefetch
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fm-stage")
        self._pending: deque[Future] = deque()

    def stream(self, jobs: Iterator[tuple[int, int, torch.Tensor]]) -> Iterator[StagedPart]:
        """Staged parts for jobs (part, order_position, shuffled rows), in order; the next `prefetch` are read
        and copied while the caller works on the current one."""
        jobs = iter(jobs)
        while True:
            while len(self._pending) < self.prefetch and (job := next(jobs, None)) is not None:
                self._pending.append(self._pool.submit(self._stage, *job))
            if not self._pending:
                return
            yield self._pending.popleft().result()

    def close(self) -> None:
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True)

    def _stage(self, part: int, order_position: int, rows: torch.Tensor) -> StagedPart:
        with record_function("loader: stage part"):  # names this thread's work in a profiler trace
            return self._read_and_copy(part, order_position, rows)

    def _read_and_copy(self, part: int, order_position: int, rows: torch.Tensor) -> StagedPart:
        data = self.shards.read_part(part, self.names, pin_memory=self._stream is not None)
        visible = visible_chunks(data["positions"], self.shards.compress_rate)
        # copies, so that no host tensor keeps the (pinned) buffer from reuse once it is on the device
        host = {"labels/indptr": data["labels/indptr"].clone(), "visible": visible, "rows": rows}
        if self._stream is None:
            return StagedPart(part, order_position, {**_with_spare_index(data), "visible": visible, "rows": rows},
                              host, None)
        with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            moved = _with_spare_index(_move_part(data, self.device))
            moved.update({name: host[name].to(self.device, non_blocking=True) for name in ("visible", "rows")})
            ready = self._stream.record_event()
        return StagedPart(part, order_position, moved, host, ready)


def _with_spare_index(data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One spare entry after the CSR indices, so that gathers at padded slots stay in bounds."""
    indices = data["labels/indices"]
    return {**data, "labels/indices": torch.cat([indices, indices.new_zeros(1)])}


def _move_part(data: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A part read by LabelShards.load_parts, on `device`: the views of its one host buffer as views of one copy of
    that buffer (one transfer); a tensor of its own (a group's joined CSR pointers and key bases) on its own."""
    storage = data["positions"].untyped_storage()
    buffer = torch.empty(storage.nbytes(), dtype=torch.uint8)
    buffer.set_(storage)
    moved = buffer.to(device, non_blocking=True).untyped_storage()
    return {
        name: torch.empty(0, dtype=tensor.dtype, device=device).set_(
            moved, tensor.storage_offset(), tensor.shape, tensor.stride()
        )
        if tensor.untyped_storage().data_ptr() == storage.data_ptr()
        else tensor.to(device, non_blocking=True)
        for name, tensor in data.items()
    }
