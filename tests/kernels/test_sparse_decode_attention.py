"""Sparse decode attention kernel against its reference: window + gathered chunks + per-head sink."""

import pytest
import torch

from fm_transformers.kernels import HAS_TRITON
from fm_transformers.kernels.sparse_decode_attention import (
    sparse_decode_attention,
    sparse_decode_attention_reference,
    sparse_decode_attention_triton,
)

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

FP32_TOL = dict(rtol=1e-4, atol=1e-4)
HALF_TOL = dict(rtol=2e-2, atol=2e-2)  # 16-bit output, and the probabilities enter the value dot in 16 bits

# The Triton interpreter computes bfloat16 arithmetic on the raw bit patterns (unsupported, per the Triton
# debugging guide), so on CPU the 16-bit path of the kernel is checked in float16 and bfloat16 needs a GPU.
HALF_DTYPES = [
    torch.float16,
    pytest.param(
        torch.bfloat16,
        marks=pytest.mark.gpu,
    ),
]


def make_inputs(gen, device, batch, heads, dim, window, picks, n_slots, dtype, masked_window, n_valid):
    """Window entries at masked_window[b] get -inf bias; row b of comp_idx keeps n_valid[b] slots, then -1."""
    q = torch.randn(batch, heads, dim, generator=gen)
    window_kv = torch.randn(batch, window, dim, generator=gen)
    window_bias = torch.zeros(batch, window)
    for b, masked in enumerate(masked_window):
        window_bias[b, masked] = float("-inf")
    comp_slots = torch.randn(n_slots, dim, generator=gen)
    comp_idx = torch.randint(0, n_slots, (batch, picks), generator=gen)
    comp_idx[torch.arange(picks)[None, :] >= torch.tensor(n_valid)[:, None]] = -1
    sinks = torch.randn(heads, generator=gen)
    tensors = [q.to(dtype), window_kv.to(dtype), window_bias, comp_slots.to(dtype), comp_idx, sinks]
    return [x.to(device) for x in tensors] + [dim**-0.5]


def masked_and_padded_inputs(gen, device, dtype):
    masked = [[], [0, 3, 4], list(range(7))]
    return make_inputs(gen, device, 3, 5, 24, 7, 11, 19, dtype, masked_window=masked, n_valid=[11, 6, 0])


def test_sparse_decode_attention_matches_reference_with_masks_and_padding(gen, device):
    inputs = masked_and_padded_inputs(gen, device, torch.float32)
    got = sparse_decode_attention_triton(*inputs)
    assert got.dtype == torch.float32 and got.shape == (3, 5, 24)
    torch.testing.assert_close(got, sparse_decode_attention_reference(*inputs), **FP32_TOL)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_sparse_decode_attention_matches_reference_in_16_bits(gen, device, dtype):
    inputs = masked_and_padded_inputs(gen, device, dtype)
    got = sparse_decode_attention_triton(*inputs)
    assert got.dtype == dtype
    torch.testing.assert_close(got, sparse_decode_attention_reference(*inputs), **HALF_TOL)


def test_sparse_decode_attention_spans_several_blocks_of_entries(gen, device):
    inputs = make_inputs(gen, device, 2, 17, 40, 45, 70, 90, torch.float32, masked_window=[[], [1]], n_valid=[70, 33])
    torch.testing.assert_close(
        sparse_decode_attention_triton(*inputs), sparse_decode_attention_reference(*inputs), **FP32_TOL
    )


def test_sparse_decode_attention_with_nothing_visible_returns_zeros(gen, device):
    """All probability mass goes to the sink, which carries no value: the output is 0, never NaN."""
    inputs = make_inputs(gen, device, 2, 5, 24, 7, 11, 19, torch.float32, masked_window=[range(7)] * 2, n_valid=[0, 0])
    got = sparse_decode_attention_triton(*inputs)
    assert torch.equal(got, torch.zeros_like(got))


def test_sparse_decode_attention_with_no_entries_at_all_returns_zeros(gen, device):
    inputs = make_inputs(gen, device, 2, 5, 24, 0, 0, 19, torch.float32, masked_window=[[], []], n_valid=[0, 0])
    got = sparse_decode_attention_triton(*inputs)
    assert torch.equal(got, torch.zeros_like(got))


def test_sparse_decode_attention_sink_takes_probability_mass(gen, device):
    """Raising one head's sink shrinks that head's output towards zero and leaves the other heads alone."""
    inputs = make_inputs(gen, device, 1, 5, 24, 7, 11, 19, torch.float32, masked_window=[[]], n_valid=[11])
    before = sparse_decode_attention_triton(*inputs)
    inputs[5] = inputs[5].clone()
    inputs[5][2] += 4.0
    after = sparse_decode_attention_triton(*inputs)
    torch.testing.assert_close(after[:, [0, 1, 3, 4]], before[:, [0, 1, 3, 4]], **FP32_TOL)
    torch.testing.assert_close(after[:, 2], before[:, 2] * after[:, 2].norm() / before[:, 2].norm(), **FP32_TOL)
    assert after[:, 2].norm() < before[:, 2].norm()
    torch.testing.assert_close(after, sparse_decode_attention_reference(*inputs), **FP32_TOL)


def test_sparse_decode_attention_rejects_mixed_dtypes(gen, device):
    inputs = make_inputs(gen, device, 1, 5, 24, 7, 11, 19, torch.bfloat16, masked_window=[[]], n_valid=[11])
    inputs[0] = inputs[0].float()
    with pytest.raises(ValueError, match="one dtype"):
        sparse_decode_attention_triton(*inputs)


@pytest.mark.gpu
def test_sparse_decode_attention_matches_reference_at_real_sizes_on_gpu(gen):
    masked = [[], list(range(100)), list(range(128)), [5, 77]]
    inputs = make_inputs(
        gen, "cuda", 4, 64, 512, 128, 512, 8192, torch.bfloat16, masked_window=masked, n_valid=[512, 400, 0, 1]
    )
    want = sparse_decode_attention_reference(*inputs)
    torch.testing.assert_close(sparse_decode_attention(*inputs), want, **HALF_TOL)
