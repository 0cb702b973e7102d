"""The cold pool: every compressed entry of one kind for one layer, on the host.

Invariant: the cold pool always holds every compressed entry ever made, in order, so it equals what the
stock cache would hold (entries written in place on the device reach it as soon as they are complete, see
cache.LookaheadCSALayer.flush_to_pool). Entries are rows of `dim` numbers, addressed by (sequence, chunk id).
"""

import torch

from .fp8 import FP8_DTYPE, dequantize_fp8, quantize_fp8
from .kernels.gather import gather_slab_chunks, slab_addresses


class ColdPool:
    """Host storage of one kind of entry for one layer and every sequence of a batch.

    It grows by slabs of `slab_chunks` entries, so appending never copies what is already stored. Slabs are
    pinned when the model runs on CUDA, so chunks can be read by the GPU or copied asynchronously. A pool of
    dtype FP8_DTYPE stores e4m3 codes in `slabs` and one fp32 scale per entry in `scale_slabs` (fp8.py), and
    dequantizes what it fetches; any other dtype stores the entries themselves, converted to it.
    """

    def __init__(self, batch_size: int, dim: int, dtype: torch.dtype, pin_memory: bool, slab_chunks: int = 1024):
        self.batch_size, self.dim, self.dtype = batch_size, dim, dtype
        self.pin_memory, self.slab_chunks = pin_memory, slab_chunks
        self.quantized = dtype == FP8_DTYPE
        self.slabs: list[torch.Tensor] = []  # each (batch, slab_chunks, dim)
        self.scale_slabs: list[torch.Tensor] = []  # FP8 only: each (batch, slab_chunks, 1) fp32
        self.length = 0
        self._addresses: dict[str, torch.Tensor] = {}  # see _slab_addresses

    def append(self, entries: torch.Tensor, non_blocking: bool = False) -> None:
        """entries: (batch, n, dim) on any device; copied to host, converted to the pool dtype (FP8: quantized
        where they are, so only codes and scales cross to the host). `non_blocking` queues a device-to-pinned
        copy on the current stream instead of waiting for it (host readers then synchronize first)."""
        planes = [(self.slabs, self.dim, self.dtype, entries)]
        if self.quantized:
            codes, scales = quantize_fp8(entries)
            planes = [(self.slabs, self.dim, self.dtype, codes), (self.scale_slabs, 1, torch.float32, scales)]
        written = 0
        count = entries.shape[1]
        while written < count:
            slab, offset = divmod(self.length, self.slab_chunks)
            take = min(count - written, self.slab_chunks - offset)
            for slabs, width, dtype, values in planes:
                if slab == len(slabs):
                    slabs.append(
                        torch.empty(self.batch_size, self.slab_chunks, width, dtype=dtype, pin_memory=self.pin_memory)
                    )
                slabs[slab][:, offset : offset + take].copy_(values[:, written : written + take], non_blocking=non_blocking)
            written += take
            self.length += take

    def fetch_into(self, rows: torch.Tensor, chunk_ids: torch.Tensor, dst: torch.Tensor, dst_rows: torch.Tensor) -> list[torch.Tensor]:
        """dst[dst_rows[i]] = entry of sequence rows[i] at chunk_ids[i], for a device or host `dst` (M,) indices.

        One gather over all slabs, issued on the current stream: on a GPU the kernel reads the pinned slabs
        in place (no staging copy). Returns the slabs read, which must outlive the copies.
        """
        if chunk_ids.numel() and int(chunk_ids.max()) >= self.length:
            raise IndexError(f"chunk {int(chunk_ids.max())} requested, the pool holds {self.length}")
        slab_idx, src_rows = chunk_ids // self.slab_chunks, rows * self.slab_chunks + chunk_ids % self.slab_chunks
        if self.quantized:
            return self._fetch_dequantized(slab_idx, src_rows, dst, dst_rows)
        staging = dst if dst.dtype == self.dtype else torch.empty(dst_rows.numel(), self.dim, dtype=self.dtype, device=dst.device)
        staged_rows = dst_rows if staging is dst else torch.arange(dst_rows.numel(), device=dst.device)
        slabs = self._gather("entries", self.slabs, slab_idx, src_rows, staging, staged_rows)
        if staging is not dst:
            dst[dst_rows] = staging.to(dst.dtype)
        return slabs

    def _fetch_dequantized(self, slab_idx, src_rows, dst, dst_rows) -> list[torch.Tensor]:
        """The FP8 fetch: gather codes (as bytes) and scales onto dst's device, dequantize there, scatter."""
        count, device = dst_rows.numel(), dst.device
        staged_rows = torch.arange(count, device=device)
        codes = torch.empty(count, self.dim, dtype=torch.uint8, device=device)
        scales = torch.empty(count, 1, dtype=torch.float32, device=device)
        code_slabs = [slab.view(torch.uint8) for slab in self.slabs]  # the gather moves bytes
        read = self._gather("codes", code_slabs, slab_idx, src_rows, codes, staged_rows)
        read += self._gather("scales", self.scale_slabs, slab_idx, src_rows, scales, staged_rows)
        dst[dst_rows] = dequantize_fp8(codes.view(FP8_DTYPE), scales, dst.dtype)
        return read

    def _gather(self, plane: str, slabs, slab_idx, src_rows, dst, dst_rows) -> list[torch.Tensor]:
        """One gather from the slabs of one plane (entries, or FP8 codes / scales); returns the views read."""
        views = [slab.view(-1, slab.shape[-1]) for slab in slabs]  # row b * slab_chunks + offset: sequence b
        addresses = self._slab_addresses(plane, views, dst.device) if dst.is_cuda else None
        gather_slab_chunks(views, slab_idx, src_rows, dst, dst_rows, addresses)
        return views

    def _slab_addresses(self, plane: str, slabs: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        """The kernel's table of slab addresses, rebuilt only when slabs were added or replaced."""
        addresses = self._addresses.get(plane)
        if addresses is None or addresses.numel() != len(slabs) or addresses.device != device:
            addresses = self._addresses[plane] = slab_addresses(slabs, device)
        return addresses

    def read(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """(batch, stop - start, dim): a contiguous copy of a range, for every sequence; an FP8 pool gives
        its entries back dequantized, in float32."""
        if self.pin_memory and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # copies queued with non_blocking=True must have landed
        stop = self.length if stop is None else stop
        if self.quantized:
            codes, scales = self._read(self.slabs, start, stop), self._read(self.scale_slabs, start, stop)
            return dequantize_fp8(codes, scales, torch.float32)
        return self._read(self.slabs, start, stop)

    def _read(self, slabs: list[torch.Tensor], start: int, stop: int) -> torch.Tensor:
        parts = []
        for slab in range(start // self.slab_chunks, (stop + self.slab_chunks - 1) // self.slab_chunks):
            base = slab * self.slab_chunks
            lo, hi = max(start, base) - base, min(stop, base + self.slab_chunks) - base
            parts.append(slabs[slab][:, lo:hi])
        if not parts:
            width, dtype = (1, torch.float32) if slabs is self.scale_slabs else (self.dim, self.dtype)
            return torch.empty(self.batch_size, 0, width, dtype=dtype)
        return torch.cat(parts, dim=1)

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep sequence rows[i] as row i (beam search); the batch size may change."""
        rows = rows.cpu()

        def reordered(slabs):
            picked = [slab.index_select(0, rows) for slab in slabs]
            return [slab.pin_memory() for slab in picked] if self.pin_memory else picked

        self.slabs, self.scale_slabs = reordered(self.slabs), reordered(self.scale_slabs)
        self._addresses = {}
        self.batch_size = rows.numel()

    def allocated_bytes(self) -> int:
        """Host bytes of the slabs (and FP8 scale slabs): stored entries and room for more."""
        return sum(slab.untyped_storage().nbytes() for slab in self.slabs + self.scale_slabs)

    def stored_bytes(self) -> int:
        """Host bytes of the stored entries (FP8: codes and scales), measured from the slab views that hold them."""
        full, part = divmod(self.length, self.slab_chunks)
        slab_lists = [slabs for slabs in (self.slabs, self.scale_slabs) if slabs]
        nbytes = sum(slab.nbytes for slabs in slab_lists for slab in slabs[:full])
        return nbytes + sum(slabs[full][:, :part].nbytes for slabs in slab_lists if part)

    def entry_bytes(self) -> int:
        """Host bytes of one stored entry (FP8: its codes and its scale), read off the slabs; what a fetch
        moves per entry. 0 before the first append."""
        return sum(slabs[0][0, 0].nbytes for slabs in (self.slabs, self.scale_slabs) if slabs)
