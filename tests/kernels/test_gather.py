"""Chunk recall from the cold pool into GPU slots: the Triton gather and the staging copy against the reference."""

import pytest
import torch

from fm_transformers.kernels import HAS_TRITON
from fm_transformers.kernels.gather import (
    gather_chunks,
    gather_chunks_copy,
    gather_chunks_reference,
    gather_chunks_triton,
    gather_slab_chunks,
    gather_slab_chunks_reference,
    gather_slab_chunks_triton,
)

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def make_inputs(gen, device, n_pool, n_slots, n_moved, dim, dtype):
    """A host pool (pinned when the slots are on a GPU), slots already holding other data, distinct rows."""
    src = torch.randn(n_pool, dim, generator=gen).to(dtype)
    src = src.pin_memory() if device == "cuda" else src
    dst = torch.randn(n_slots, dim, generator=gen).to(dtype).to(device)
    src_idx = torch.randperm(n_pool, generator=gen)[:n_moved].to(device)
    dst_idx = torch.randperm(n_slots, generator=gen)[:n_moved].to(device)
    return src, src_idx, dst, dst_idx


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gather_chunks_triton_matches_reference_and_leaves_other_slots_alone(gen, device, dtype):
    src, src_idx, dst, dst_idx = make_inputs(gen, device, 41, 23, 13, 24, dtype)
    want = gather_chunks_reference(src, src_idx, dst.clone(), dst_idx)
    untouched = dst.clone()
    assert gather_chunks_triton(src, src_idx, dst, dst_idx) is dst
    assert torch.equal(dst, want)
    others = torch.ones(23, dtype=torch.bool, device=device).index_fill_(0, dst_idx, False)
    assert torch.equal(dst[others], untouched[others])


def test_gather_chunks_copy_matches_reference(gen, device):
    src, src_idx, dst, dst_idx = make_inputs(gen, device, 41, 23, 13, 24, torch.bfloat16)
    want = gather_chunks_reference(src, src_idx, dst.clone(), dst_idx)
    assert torch.equal(gather_chunks_copy(src, src_idx, dst, dst_idx), want)


@needs_triton
def test_gather_chunks_of_nothing_changes_nothing(gen, device):
    src, src_idx, dst, dst_idx = make_inputs(gen, device, 41, 23, 0, 24, torch.float32)
    before = dst.clone()
    assert torch.equal(gather_chunks_triton(src, src_idx, dst, dst_idx), before)


def test_gather_chunks_rejects_pool_and_slots_of_different_layouts(gen, device):
    src, src_idx, dst, dst_idx = make_inputs(gen, device, 41, 23, 13, 24, torch.float32)
    with pytest.raises(ValueError, match="same dtype and row size"):
        gather_chunks_copy(src.bfloat16(), src_idx, dst, dst_idx)


@needs_triton
@pytest.mark.gpu
def test_gather_chunks_reads_the_pinned_pool_in_place_at_real_sizes_on_gpu(gen):
    """A pool of 100K bf16 chunks of 512 values; recall 10% of it into 12K slots."""
    src, src_idx, dst, dst_idx = make_inputs(gen, "cuda", 100_000, 12_000, 10_000, 512, torch.bfloat16)
    want = gather_chunks_reference(src, src_idx, dst.clone(), dst_idx)
    assert torch.equal(gather_chunks(src, src_idx, dst, dst_idx), want)


@pytest.mark.gpu
def test_gather_chunks_copy_from_a_pinned_pool_at_real_sizes_on_gpu(gen):
    src, src_idx, dst, dst_idx = make_inputs(gen, "cuda", 100_000, 12_000, 10_000, 512, torch.bfloat16)
    want = gather_chunks_reference(src, src_idx, dst.clone(), dst_idx)
    assert torch.equal(gather_chunks_copy(src, src_idx, dst, dst_idx), want)


@pytest.mark.gpu
def test_gather_chunks_from_a_pageable_pool_takes_the_staging_copy_on_gpu(gen):
    """The GPU cannot read pageable host memory: the dispatcher must not hand such a pool to the kernel."""
    src, src_idx, dst, dst_idx = make_inputs(gen, "cuda", 1000, 300, 200, 512, torch.bfloat16)
    src = src.clone()
    assert not src.is_pinned()
    want = gather_chunks_reference(src, src_idx, dst.clone(), dst_idx)
    assert torch.equal(gather_chunks(src, src_idx, dst, dst_idx), want)


def make_slab_inputs(gen, device, n_slabs, slab_rows, n_slots, n_moved, dim, dtype):
    """Host slabs (pinned when the slots are on a GPU), slots already holding other data, distinct chunks."""
    slabs = [torch.randn(slab_rows, dim, generator=gen).to(dtype) for _ in range(n_slabs)]
    slabs = [slab.pin_memory() for slab in slabs] if device == "cuda" else slabs
    flat = torch.randperm(n_slabs * slab_rows, generator=gen)[:n_moved]
    dst = torch.randn(n_slots, dim, generator=gen).to(dtype).to(device)
    dst_idx = torch.randperm(n_slots, generator=gen)[:n_moved].to(device)
    return slabs, (flat // slab_rows).to(device), (flat % slab_rows).to(device), dst, dst_idx


def reference_from_concatenation(slabs, slab_idx, row_idx, dst, dst_idx):
    """The same gather stated another way: index the slabs laid end to end."""
    rows = slab_idx.cpu() * slabs[0].shape[0] + row_idx.cpu()
    return gather_chunks_reference(torch.cat(slabs), rows, dst, dst_idx)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_slab_chunks_triton_reads_every_slab_in_one_launch(gen, device, dtype):
    slabs, slab_idx, row_idx, dst, dst_idx = make_slab_inputs(gen, device, 5, 9, 30, 21, 24, dtype)
    want = reference_from_concatenation(slabs, slab_idx, row_idx, dst.clone(), dst_idx)
    assert torch.equal(gather_slab_chunks_reference(slabs, slab_idx, row_idx, dst.clone(), dst_idx), want)
    untouched = dst.clone()
    assert gather_slab_chunks_triton(slabs, slab_idx, row_idx, dst, dst_idx) is dst
    assert torch.equal(dst, want)
    others = torch.ones(30, dtype=torch.bool, device=device).index_fill_(0, dst_idx, False)
    assert torch.equal(dst[others], untouched[others])


@needs_triton
def test_gather_slab_chunks_of_nothing_changes_nothing(gen, device):
    slabs, slab_idx, row_idx, dst, dst_idx = make_slab_inputs(gen, device, 3, 9, 30, 0, 24, torch.float32)
    before = dst.clone()
    assert torch.equal(gather_slab_chunks_triton(slabs, slab_idx, row_idx, dst, dst_idx), before)


def test_gather_slab_chunks_dispatch_matches_reference(gen, device):
    slabs, slab_idx, row_idx, dst, dst_idx = make_slab_inputs(gen, device, 4, 16, 40, 33, 32, torch.bfloat16)
    want = reference_from_concatenation(slabs, slab_idx, row_idx, dst.clone(), dst_idx)
    assert torch.equal(gather_slab_chunks(slabs, slab_idx, row_idx, dst, dst_idx), want)


def test_gather_slab_chunks_rejects_slabs_of_different_strides(gen, device):
    slabs, slab_idx, row_idx, dst, dst_idx = make_slab_inputs(gen, device, 2, 16, 40, 8, 32, torch.float32)
    slabs[1] = slabs[1].t().contiguous().t()
    with pytest.raises(ValueError, match="same dtype, row size and strides"):
        gather_slab_chunks_reference(slabs, slab_idx, row_idx, dst, dst_idx)


@needs_triton
@pytest.mark.gpu
def test_gather_slab_chunks_reads_pinned_slabs_at_real_sizes_on_gpu(gen):
    """A pool of 100 slabs of 1024 bf16 chunks of 512 values; recall 10,000 chunks in one launch."""
    slabs, slab_idx, row_idx, dst, dst_idx = make_slab_inputs(gen, "cuda", 100, 1024, 12_000, 10_000, 512, torch.bfloat16)
    want = reference_from_concatenation(slabs, slab_idx, row_idx, dst.clone(), dst_idx)
    assert torch.equal(gather_slab_chunks(slabs, slab_idx, row_idx, dst, dst_idx), want)


@needs_triton
@pytest.mark.parametrize("width", [24, 1])  # an FP8 pool's planes: e4m3 codes (moved as bytes), one fp32 scale
def test_gather_slab_chunks_triton_moves_fp8_code_bytes_and_one_wide_scales(gen, device, width):
    values = [torch.randn(9, width, generator=gen) * 50 for _ in range(4)]
    if width == 1:
        slabs = [value.float() for value in values]
    else:
        slabs = [value.to(torch.float8_e4m3fn).view(torch.uint8) for value in values]
    slabs = [slab.pin_memory() for slab in slabs] if device == "cuda" else slabs
    flat = torch.randperm(36, generator=gen)[:17]
    slab_idx, row_idx = (flat // 9).to(device), (flat % 9).to(device)
    dst = torch.zeros(20, width, dtype=slabs[0].dtype, device=device)
    dst_idx = torch.randperm(20, generator=gen)[:17].to(device)
    want = reference_from_concatenation(slabs, slab_idx, row_idx, dst.clone(), dst_idx)
    assert torch.equal(gather_slab_chunks_triton(slabs, slab_idx, row_idx, dst, dst_idx), want)
