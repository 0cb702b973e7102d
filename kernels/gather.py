"""Recall: gather compressed chunks from the (pinned) host cold pool into GPU slots.

When level 1 changes the resident set, the chunks that became resident are copied from the CPU cold pool of
each CSA layer into free GPU slots: dst[dst_idx[i]] = src[src_idx[i]].

    src (N_pool, D) host tensor, pinned when the slots are on a GPU; src_idx (M,) int64 on dst's device;
    dst (N_slots, D); dst_idx (M,) int64 on dst's device.

The chunks are scattered (1 KB each in bf16), so a copy per chunk is hopeless. The Triton kernel reads the pinned
pool directly through its mapped device address (a pinned host pointer is a valid device address under
unified addressing, and Triton's launcher resolves it): one pass, no staging buffer, no host sync, and the
indices never leave the GPU. On an H100 it moves about 48 GB/s (10,000 scattered chunks), close to the
55 GB/s of one contiguous pinned copy; the fallback `gather_chunks_copy`, which gathers on the CPU into a
pinned staging buffer and copies that once, reached about half of that.

The cold pool grows by slabs, so its chunks live in many tensors. `gather_slab_chunks` reads them all in one
launch from a table of slab addresses: a launch per slab cost about 90 us of host time each, 200 launches a
recall at 1M tokens (measured on an H200, most of a refresh step's time).
"""

import torch

from ._backend import block_size, require_triton, runs_triton, tl, triton


@triton.jit
def _gather_kernel(
    src_ptr,  # (N_pool, D) strided, host (pinned) or device
    src_idx_ptr,  # (M,)
    dst_ptr,  # (N_slots, D) strided
    dst_idx_ptr,  # (M,)
    M,
    D,
    stride_sn,
    stride_sd,
    stride_dn,
    stride_dd,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_m = rows < M
    src_row = tl.load(src_idx_ptr + rows, mask=in_m, other=0).to(tl.int64)
    dst_row = tl.load(dst_idx_ptr + rows, mask=in_m, other=0).to(tl.int64)
    mask = in_m[:, None] & (d[None, :] < D)
    chunk = tl.load(src_ptr + src_row[:, None] * stride_sn + d[None, :] * stride_sd, mask=mask)
    tl.store(dst_ptr + dst_row[:, None] * stride_dn + d[None, :] * stride_dd, chunk, mask=mask)


def _check(src: torch.Tensor, dst: torch.Tensor) -> None:
    if src.dtype != dst.dtype or src.shape[1:] != dst.shape[1:]:
        raise ValueError(
            f"src {src.dtype} {tuple(src.shape)} and dst {dst.dtype} {tuple(dst.shape)} must hold the same "
            "chunks: same dtype and row size"
        )


@triton.jit
def _gather_slabs_kernel(
    addresses_ptr,  # (S,) int64: the address of each slab's first element, host (pinned) or device
    slab_idx_ptr,  # (M,)
    row_idx_ptr,  # (M,) rows within the slab
    dst_ptr,  # (N_slots, D) strided
    dst_idx_ptr,  # (M,)
    M,
    D,
    stride_sn,  # the same for every slab
    stride_sd,
    stride_dn,
    stride_dd,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_m = rows < M
    slab = tl.load(slab_idx_ptr + rows, mask=in_m, other=0).to(tl.int64)
    base = tl.load(addresses_ptr + slab, mask=in_m, other=0).to(tl.pointer_type(dst_ptr.dtype.element_ty))
    src_row = tl.load(row_idx_ptr + rows, mask=in_m, other=0).to(tl.int64)
    dst_row = tl.load(dst_idx_ptr + rows, mask=in_m, other=0).to(tl.int64)
    mask = in_m[:, None] & (d[None, :] < D)
    chunk = tl.load(base[:, None] + src_row[:, None] * stride_sn + d[None, :] * stride_sd, mask=mask)
    tl.store(dst_ptr + dst_row[:, None] * stride_dn + d[None, :] * stride_dd, chunk, mask=mask)


def gather_chunks_triton(
    src: torch.Tensor, src_idx: torch.Tensor, dst: torch.Tensor, dst_idx: torch.Tensor
) -> torch.Tensor:
    """Triton launcher of `gather_chunks`: the GPU reads the pinned pool in place. Returns dst."""
    require_triton("gather_chunks")
    _check(src, dst)
    return _launch(_gather_kernel, (src, src_idx), src.stride(), dst, dst_idx)


def _launch(kernel, sources: tuple, src_stride: tuple[int, int], dst: torch.Tensor, dst_idx: torch.Tensor):
    """Launch a gather kernel whose arguments are `sources`, then dst, dst_idx, sizes and strides: one
    program per 16 rows and up to 512 columns. Returns dst."""
    n_rows, dim = dst_idx.shape[0], dst.shape[1]
    if n_rows == 0:
        return dst
    block_m = 16
    block_d = min(block_size(dim), 512)
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(dim, block_d))
    kernel[grid](
        *sources,
        dst,
        dst_idx,
        n_rows,
        dim,
        *src_stride,
        *dst.stride(),
        BLOCK_M=block_m,
        BLOCK_D=block_d,
        num_warps=4,
    )
    return dst


def gather_chunks_copy(
    src: torch.Tensor, src_idx: torch.Tensor, dst: torch.Tensor, dst_idx: torch.Tensor
) -> torch.Tensor:
    """Fallback without Triton: CPU gather into a pinned staging buffer, one async copy, then a GPU scatter.

    Reading src_idx on the host syncs with the GPU. The staging buffer comes from torch's pinned allocator,
    which does not hand it out again until the asynchronous copy from it has finished.
    """
    _check(src, dst)
    rows = src_idx.cpu()
    staging = torch.empty((rows.shape[0], *src.shape[1:]), dtype=src.dtype, pin_memory=dst.is_cuda)
    torch.index_select(src, 0, rows, out=staging)
    return dst.index_copy_(0, dst_idx, staging.to(dst.device, non_blocking=True))


def gather_chunks_reference(
    src: torch.Tensor, src_idx: torch.Tensor, dst: torch.Tensor, dst_idx: torch.Tensor
) -> torch.Tensor:
    """The spec of `gather_chunks` in plain torch."""
    return dst.index_copy_(0, dst_idx, src[src_idx.cpu()].to(dst.device))


def gather_chunks(src: torch.Tensor, src_idx: torch.Tensor, dst: torch.Tensor, dst_idx: torch.Tensor) -> torch.Tensor:
    """Copy pool rows src[src_idx] into slots dst[dst_idx], in place; returns dst.

    GPU slots with a pinned (or device) source take the Triton kernel, GPU slots with a pageable source take
    the staging copy, CPU slots the reference. dst_idx must not repeat (the order of writes is unspecified).
    """
    if runs_triton(dst) and (src.is_cuda or src.is_pinned()):
        return gather_chunks_triton(src, src_idx, dst, dst_idx)
    if dst.is_cuda:
        return gather_chunks_copy(src, src_idx, dst, dst_idx)
    return gather_chunks_reference(src, src_idx, dst, dst_idx)


def _check_uniform(slabs: list[torch.Tensor]) -> None:
    layouts = {(slab.dtype, slab.shape[1:], slab.stride()) for slab in slabs}
    if len(layouts) > 1:
        raise ValueError(
            "every slab must have the same dtype, row size and strides (one layout is passed to the kernel)"
        )


def _check_slabs(slabs: list[torch.Tensor], dst: torch.Tensor) -> None:
    _check_uniform(slabs)
    if slabs:
        _check(slabs[0], dst)


def slab_addresses(slabs: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """(S,) int64 on `device`: each slab's data address, the table `gather_slab_chunks_triton` reads.
    Build it once per set of slabs (it checks that they share one layout; creating it copies to the device
    and waits for that copy), and pass it to every gather from those slabs."""
    _check_uniform(slabs)
    return torch.tensor([slab.data_ptr() for slab in slabs], dtype=torch.int64, device=device)


def gather_slab_chunks_triton(
    slabs: list[torch.Tensor],
    slab_idx: torch.Tensor,
    row_idx: torch.Tensor,
    dst: torch.Tensor,
    dst_idx: torch.Tensor,
    addresses: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton launcher of `gather_slab_chunks`: one launch whatever the number of slabs (each read in place
    through its mapped address, as in `gather_chunks_triton`). Returns dst."""
    require_triton("gather_slab_chunks")
    if addresses is None:
        addresses = slab_addresses(slabs, dst.device)
    if dst_idx.numel() == 0:
        return dst
    _check(slabs[0], dst)  # the table checked that the others match it
    return _launch(_gather_slabs_kernel, (addresses, slab_idx, row_idx), slabs[0].stride(), dst, dst_idx)


def gather_slab_chunks_reference(
    slabs: list[torch.Tensor], slab_idx: torch.Tensor, row_idx: torch.Tensor, dst: torch.Tensor, dst_idx: torch.Tensor
) -> torch.Tensor:
    """The spec of `gather_slab_chunks` in plain torch: dst[dst_idx[i]] = slabs[slab_idx[i]][row_idx[i]]."""
    return _per_slab(gather_chunks_reference, slabs, slab_idx, row_idx, dst, dst_idx)


def _per_slab(gather, slabs, slab_idx, row_idx, dst, dst_idx) -> torch.Tensor:
    _check_slabs(slabs, dst)
    for slab in slab_idx.unique().tolist():
        chosen = slab_idx == slab
        gather(slabs[slab], row_idx[chosen], dst, dst_idx[chosen])
    return dst


def gather_slab_chunks(
    slabs: list[torch.Tensor],
    slab_idx: torch.Tensor,
    row_idx: torch.Tensor,
    dst: torch.Tensor,
    dst_idx: torch.Tensor,
    addresses: torch.Tensor | None = None,
) -> torch.Tensor:
    """`gather_chunks` from a pool stored as several slabs (same shape and dtype): one kernel launch for all
    of them on a GPU with pinned slabs (`addresses`, from `slab_addresses`, saves rebuilding the table);
    otherwise one gather per slab touched. Returns dst."""
    if runs_triton(dst) and slabs and (slabs[0].is_cuda or slabs[0].is_pinned()):
        return gather_slab_chunks_triton(slabs, slab_idx, row_idx, dst, dst_idx, addresses)
    return _per_slab(gather_chunks, slabs, slab_idx, row_idx, dst, dst_idx)
