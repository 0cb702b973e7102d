"""What one generation cost, measured while it runs: the allocator's peak device bytes during the prefill and
during the decode (apart, since LSA holds the whole history on the device while it prefills and only the
resident set afterwards), and the host synchronizations. Both exist on CUDA only; elsewhere they read None,
never an estimate.
"""

import gc
import warnings
from contextlib import contextmanager

import torch


class CudaAllocator:
    """The CUDA caching allocator's counters of one device."""

    def __init__(self, device: torch.device):
        self.device = device

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)

    def reset_peak(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)


class PhasePeaks:
    """Context manager around a `generate`: peak bytes allocated above what was allocated at the start (the
    weights and anything held before), for the prefill (every forward before the first one-token forward) and
    for the decode (that forward on). `allocator` is None off CUDA: both peaks are then None.

    The garbage of an earlier generation is collected before the start is read: a graph-decoded LSA cache and its
    DecodeGraph refer to each other, so they outlive their row until Python's cycle collector runs, and if it ran
    mid-generation the start would count bytes freed under it (a row measured after a graph row read 0.8 MiB
    where it held 130)."""

    def __init__(self, model, allocator=None):
        self.model, self.allocator = model, allocator
        self.prefill: int | None = None
        self.decode: int | None = None

    def __enter__(self) -> "PhasePeaks":
        if self.allocator is None:
            return self
        gc.collect()
        self.allocator.reset_peak()
        self._base = self.allocator.allocated()
        self._decoding = False
        self._handle = self.model.register_forward_pre_hook(self._switch, with_kwargs=True)
        return self

    def _switch(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if not self._decoding and input_ids is not None and input_ids.shape[1] == 1:
            self.prefill = self.allocator.peak() - self._base
            self.allocator.reset_peak()
            self._decoding = True

    def __exit__(self, *exc) -> None:
        if self.allocator is None:
            return
        self._handle.remove()
        peak = self.allocator.peak() - self._base
        if self._decoding:
            self.decode = peak
        else:
            self.prefill = peak


def phase_peaks(model) -> PhasePeaks:
    device = next(model.parameters()).device
    return PhasePeaks(model, CudaAllocator(device) if device.type == "cuda" else None)


@contextmanager
def host_syncs(device: torch.device):
    """Counts the operations that make the host wait for the device (torch's sync debug mode), CUDA only.
    Yields a one-item list: [count] after the block, [None] off CUDA."""
    counted: list[int | None] = [None]
    if device.type != "cuda":
        yield counted
        return
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield counted
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    counted[0] = sum("synchroniz" in str(warning.message) for warning in caught)
