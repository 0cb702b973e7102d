"""Level-2 kernel against its reference: native indexer scores over resident candidates, then top-k."""

import pytest
import torch

from fm_transformers.kernels import HAS_TRITON
from fm_transformers.kernels.level2_topk import (
    level2_scores_reference,
    level2_scores_triton,
    level2_topk,
    level2_topk_reference,
    level2_topk_triton,
)

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

TOL = dict(rtol=1e-4, atol=1e-4)  # both sides compute in fp32; only the summation order differs


def make_inputs(gen, device, batch, heads, dk, n_slots, n_cand, key_dtype, n_valid):
    """Candidates are distinct random slots; row b keeps its first n_valid[b], the rest is -1 padding."""
    q = torch.randn(batch, heads, dk, generator=gen)
    weights = torch.randn(batch, heads, generator=gen) * heads**-0.5
    key_slots = torch.randn(n_slots, dk, generator=gen).to(key_dtype)
    cand = torch.stack([torch.randperm(n_slots, generator=gen)[:n_cand] for _ in range(batch)])
    cand[torch.arange(n_cand)[None, :] >= torch.tensor(n_valid)[:, None]] = -1
    return [x.to(device) for x in (q, weights, key_slots, cand)]


def assert_is_reference_topk(top_pos, top_scores, ref_scores, k):
    """Tie-proof check: the scores are the reference's top-k values, and each pick really has its score."""
    want = ref_scores.topk(min(k, ref_scores.shape[1]), dim=-1).values
    torch.testing.assert_close(top_scores, want, **TOL)
    picked = top_pos >= 0
    assert torch.equal(picked, torch.isfinite(want))
    torch.testing.assert_close(ref_scores.gather(1, top_pos.clamp(min=0))[picked], top_scores[picked], **TOL)
    assert all(len(set(row[row >= 0].tolist())) == int((row >= 0).sum()) for row in top_pos)


@pytest.mark.parametrize("key_dtype", [torch.float32, torch.bfloat16])
def test_level2_scores_match_reference_with_padding(gen, device, key_dtype):
    q, w, key_slots, cand = make_inputs(gen, device, 3, 5, 24, 53, 29, key_dtype, n_valid=[29, 17, 3])
    got = level2_scores_triton(q, w, key_slots, cand, None, 24**-0.5)
    torch.testing.assert_close(got, level2_scores_reference(q, w, key_slots, cand, None, 24**-0.5), **TOL)
    assert torch.equal(torch.isneginf(got), cand < 0)


def test_level2_topk_matches_reference_with_padding(gen, device):
    q, w, key_slots, cand = make_inputs(gen, device, 3, 5, 24, 53, 29, torch.float32, n_valid=[29, 17, 11])
    top_pos, top_scores = level2_topk_triton(q, w, key_slots, cand, None, 8, 0.2)
    assert top_pos.shape == (3, 8) and top_pos.dtype == torch.int64
    assert_is_reference_topk(top_pos, top_scores, level2_scores_reference(q, w, key_slots, cand, None, 0.2), 8)


def test_level2_topk_marks_picks_past_the_valid_candidates_with_minus_one(gen, device):
    q, w, key_slots, cand = make_inputs(gen, device, 2, 5, 24, 53, 29, torch.float32, n_valid=[29, 4])
    top_pos, top_scores = level2_topk_triton(q, w, key_slots, cand, None, 10, 0.2)
    assert (top_pos[1, 4:] == -1).all() and torch.isneginf(top_scores[1, 4:]).all()
    assert (top_pos[1, :4] >= 0).all() and (top_pos[0] >= 0).all()
    assert_is_reference_topk(top_pos, top_scores, level2_scores_reference(q, w, key_slots, cand, None, 0.2), 10)


def test_level2_topk_returns_at_most_the_candidate_count(gen, device):
    q, w, key_slots, cand = make_inputs(gen, device, 2, 5, 24, 53, 29, torch.float32, n_valid=[29, 29])
    top_pos, _ = level2_topk_triton(q, w, key_slots, cand, None, 2048, 0.2)
    assert top_pos.shape == (2, 29)
    assert torch.equal(top_pos.sort(dim=1).values, torch.arange(29, device=device).expand(2, 29))


def test_level2_topk_of_an_empty_candidate_set_picks_nothing(gen, device):
    q, w, key_slots, cand = make_inputs(gen, device, 2, 5, 24, 53, 29, torch.float32, n_valid=[0, 0])
    top_pos, top_scores = level2_topk_triton(q, w, key_slots, cand, None, 8, 0.2)
    assert (top_pos == -1).all() and torch.isneginf(top_scores).all()


def test_level2_topk_never_picks_a_candidate_excluded_by_the_limit(gen, device):
    q, w, key_slots, cand = make_inputs(gen, device, 3, 5, 24, 53, 29, torch.float32, n_valid=[29, 20, 29])
    limit = torch.rand(3, 29, generator=gen).to(device) < 0.5
    top_pos, top_scores = level2_topk_triton(q, w, key_slots, cand, limit, 12, 0.2)
    picked = top_pos >= 0
    assert limit.gather(1, top_pos.clamp(min=0))[picked].all()
    ref_pos, ref_scores = level2_topk_reference(q, w, key_slots, cand, limit, 12, 0.2)
    assert torch.equal(picked, ref_pos >= 0)
    torch.testing.assert_close(top_scores, ref_scores, **TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("k", [512, 2048])
def test_level2_topk_matches_reference_at_real_sizes_on_gpu(gen, k):
    valid = [16384, 9000, 300, 0]
    q, w, key_slots, cand = make_inputs(gen, "cuda", 4, 64, 128, 40000, 16384, torch.bfloat16, n_valid=valid)
    top_pos, top_scores = level2_topk(q, w, key_slots, cand, None, k, 128**-0.5)
    ref_scores = level2_scores_reference(q, w, key_slots, cand, None, 128**-0.5)
    assert_is_reference_topk(top_pos, top_scores, ref_scores, k)
