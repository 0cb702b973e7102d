"""Level-1 scoring kernel against its reference: memory-indexer scores of one layer, max-folded over layers."""

import pytest
import torch

from fm_transformers.kernels import HAS_TRITON
from fm_transformers.kernels.level1_scoring import (
    level1_scores,
    level1_scores_reference,
    level1_scores_triton,
)

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

TOL = dict(rtol=1e-4, atol=1e-4)  # both sides compute in fp32; only the summation order differs


def make_inputs(gen, device, batch, heads, dk, chunks, key_dtype, valid_len):
    q = torch.randn(batch, heads, dk, generator=gen)
    weights = torch.randn(batch, heads, generator=gen) * heads**-0.5
    keys = torch.randn(batch, chunks, dk, generator=gen).to(key_dtype)
    valid = torch.tensor(valid_len)
    return [x.to(device) for x in (q, weights, keys, valid)]


@pytest.mark.parametrize("key_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_level1_scores_match_reference_with_invalid_tail(gen, device, key_dtype):
    inputs = make_inputs(gen, device, 3, 5, 24, 37, key_dtype, valid_len=[37, 20, 0])
    got = level1_scores_triton(*inputs)
    want = level1_scores_reference(*inputs)
    torch.testing.assert_close(got, want, **TOL)
    assert torch.isneginf(got[1, 20:]).all() and torch.isneginf(got[2]).all()
    assert torch.isfinite(got[0]).all()


def test_level1_running_max_is_the_union_over_layers_in_place(gen, device):
    layers = [make_inputs(gen, device, 2, 7, 40, 70, torch.bfloat16, valid_len=[70, 51]) for _ in range(3)]
    running = torch.randn(2, 70, generator=gen).sigmoid().to(device)
    want = running.clone()
    for layer in layers:
        assert level1_scores_triton(*layer, running_max=running) is running
        want = level1_scores_reference(*layer, running_max=want)
    torch.testing.assert_close(running, want, **TOL)


def test_level1_selection_keeps_a_chunk_that_clears_the_threshold_in_any_layer(gen, device):
    layers = [make_inputs(gen, device, 2, 5, 24, 37, torch.float32, valid_len=[37, 30]) for _ in range(3)]
    running = None
    for layer in layers:
        running = level1_scores_triton(*layer, running_max=running)
    per_layer = torch.stack([level1_scores_reference(*layer) >= 0.5 for layer in layers])  # (3, B, T)
    assert torch.equal(running >= 0.5, per_layer.any(dim=0))


def test_level1_scores_reject_a_running_max_of_the_wrong_shape(gen, device):
    inputs = make_inputs(gen, device, 2, 5, 24, 37, torch.float32, valid_len=[37, 30])
    with pytest.raises(ValueError, match="running_max"):
        level1_scores(*inputs, running_max=torch.zeros(2, 36, device=device))


@pytest.mark.gpu
def test_level1_scores_match_reference_at_real_sizes_on_gpu(gen):
    inputs = make_inputs(gen, "cuda", 2, 128, 128, 32768, torch.bfloat16, valid_len=[32768, 20001])
    torch.testing.assert_close(level1_scores(*inputs), level1_scores_reference(*inputs), **TOL)
