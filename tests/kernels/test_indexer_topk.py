"""Streamed native-indexer top-k (Triton and reference) against an unblocked oracle: the stock (N, T) scores."""

import pytest
import torch

from fm_transformers.kernels import HAS_TRITON
from fm_transformers.kernels.indexer_topk import (
    indexer_topk,
    indexer_topk_reference,
    indexer_topk_triton,
    stream_blocks,
)

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

# Both sides read the same inputs and accumulate in fp32; bf16 products are exact in fp32, but tensor cores
# sum them in another order, so bf16 gets a looser bound.
TOLS = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}
IMPLS = [
    pytest.param(indexer_topk_reference, torch.float32, id="reference-fp32"),
    pytest.param(indexer_topk_reference, torch.bfloat16, id="reference-bf16"),
    pytest.param(indexer_topk_triton, torch.float32, id="triton-fp32"),
    pytest.param(indexer_topk_triton, torch.bfloat16, id="triton-bf16"),
]
SCALE = 24**-0.5


def make_inputs(gen, device, n, heads, dk, n_keys, dtype, limit):
    q = torch.randn(n, heads, dk, generator=gen).to(dtype)
    weights = torch.randn(n, heads, generator=gen) * heads**-0.5
    keys = torch.randn(n_keys, dk, generator=gen).to(dtype)
    return [x.to(device) for x in (q, weights, keys, torch.as_tensor(limit, dtype=torch.int64))]


def random_limits(gen, n, n_keys):
    """Limits anywhere from 0 (sees nothing) to past the end of the history (sees everything)."""
    limit = torch.randint(0, n_keys + 20, (n,), generator=gen)
    limit[:3] = torch.tensor([0, n_keys, n_keys + 100])
    return limit


def naive_scores(q, weights, keys, limit, softmax_scale):
    """The stock scorer, unblocked: full (N, H, T) fp32, then keys at or past limit[n] masked to -inf."""
    scores = torch.matmul(q.float(), keys.float().T).relu() * softmax_scale  # (N, H, T)
    scores = (scores * weights[:, :, None]).sum(dim=1)  # (N, T)
    position = torch.arange(keys.shape[0], device=keys.device)
    return scores.masked_fill(position[None, :] >= limit[:, None], float("-inf"))


def assert_is_naive_topk(indices, scores, oracle, k, tol):
    """Same score values per row; same index sets except between keys tied (within tol) at the cut-off."""
    want_scores, want_idx = oracle.topk(min(k, oracle.shape[1]), dim=1)
    assert indices.shape == want_idx.shape and indices.dtype == torch.int64 and scores.dtype == torch.float32
    torch.testing.assert_close(scores, want_scores, **tol)
    picked = torch.isfinite(want_scores)
    assert torch.equal(indices >= 0, picked) and (indices[~picked] == -1).all()
    torch.testing.assert_close(oracle.gather(1, indices.clamp(min=0))[picked], scores[picked], **tol)
    for row in range(indices.shape[0]):
        got, want = set(indices[row][picked[row]].tolist()), set(want_idx[row][picked[row]].tolist())
        assert len(got) == int(picked[row].sum())
        if got != want:
            cut = want_scores[row][picked[row]][-1]
            differing = torch.tensor(sorted(got ^ want), device=oracle.device)
            torch.testing.assert_close(oracle[row, differing], cut.expand(len(differing)), **tol)


@pytest.mark.parametrize("op, dtype", IMPLS)
def test_indexer_topk_matches_the_unblocked_topk_at_odd_sizes(gen, device, op, dtype):
    inputs = make_inputs(gen, device, 37, 5, 24, 301, dtype, random_limits(gen, 37, 301))
    indices, scores = op(*inputs, 16, SCALE)
    assert_is_naive_topk(indices, scores, naive_scores(*inputs, SCALE), 16, TOLS[dtype])


@pytest.mark.parametrize("op, dtype", IMPLS)
def test_indexer_topk_merges_across_many_key_and_query_blocks(gen, device, op, dtype):
    inputs = make_inputs(gen, device, 37, 5, 24, 301, dtype, random_limits(gen, 37, 301))
    budget = 160 * 4  # 160 (query, key) fp32 scores of the kernel's buffer, 32 of the reference's (Nq, H, Tk)
    for bytes_per_pair in (4, 4 * 5):
        query_block, key_block = stream_blocks(37, 301, 16, bytes_per_pair, budget)
        assert query_block < 37 and 16 <= key_block < 301
    indices, scores = op(*inputs, 16, SCALE, max_buffer_bytes=budget)
    assert_is_naive_topk(indices, scores, naive_scores(*inputs, SCALE), 16, TOLS[dtype])


@pytest.mark.parametrize("op, dtype", IMPLS)
def test_indexer_topk_of_a_history_shorter_than_k_returns_every_visible_key(gen, device, op, dtype):
    inputs = make_inputs(gen, device, 6, 5, 24, 11, dtype, [11, 11, 4, 0, 30, 7])
    indices, scores = op(*inputs, 16, SCALE)
    assert indices.shape == (6, 11)
    assert torch.equal(indices[0].sort().values, torch.arange(11, device=device))
    assert (indices[2, 4:] == -1).all() and torch.isneginf(scores[2, 4:]).all() and (indices[2, :4] >= 0).all()
    assert_is_naive_topk(indices, scores, naive_scores(*inputs, SCALE), 16, TOLS[dtype])


@pytest.mark.parametrize("op, dtype", IMPLS)
def test_indexer_topk_of_a_query_that_sees_nothing_picks_nothing(gen, device, op, dtype):
    inputs = make_inputs(gen, device, 4, 5, 24, 301, dtype, [0, 0, 0, 0])
    indices, scores = op(*inputs, 16, SCALE, max_buffer_bytes=4096)
    assert indices.shape == (4, 16) and (indices == -1).all() and torch.isneginf(scores).all()


@pytest.mark.parametrize("op, dtype", IMPLS)
def test_indexer_topk_reads_a_strided_view_of_a_bigger_key_table(gen, device, op, dtype):
    q, weights, table, limit = make_inputs(gen, device, 37, 5, 24, 700, dtype, random_limits(gen, 37, 301))
    wide = torch.cat([table, table.flip(0)], dim=1)  # (700, 48): rows of 48, keys are the first 24 columns
    keys = wide[50:652:2, :24]  # (301, 24), stride(0) = 96
    assert keys.stride() == (96, 1)
    indices, scores = op(q, weights, keys, limit, 16, SCALE, max_buffer_bytes=20 * 64 * 20)
    oracle = naive_scores(q, weights, keys.contiguous(), limit, SCALE)
    assert_is_naive_topk(indices, scores, oracle, 16, TOLS[dtype])


def test_indexer_topk_runs_the_reference_on_cpu_tensors(gen):
    inputs = make_inputs(gen, "cpu", 37, 5, 24, 301, torch.float32, random_limits(gen, 37, 301))
    for got, want in zip(indexer_topk(*inputs, 16, SCALE), indexer_topk_reference(*inputs, 16, SCALE)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("n_queries, n_keys, k, bytes_per_pair", [(4096, 262144, 512, 4), (16384, 262144, 2048, 256),
                                                                  (37, 301, 16, 20), (1, 5, 2048, 4)])
def test_stream_blocks_keep_the_buffer_under_budget_with_key_blocks_that_hold_the_topk(
    n_queries, n_keys, k, bytes_per_pair
):
    budget = 256 * 2**20
    query_block, key_block = stream_blocks(n_queries, n_keys, k, bytes_per_pair, budget)
    assert key_block & (key_block - 1) == 0 and key_block >= min(k, n_keys) and key_block < 2 * max(n_keys, 1)
    assert 1 <= query_block <= n_queries and query_block * key_block * bytes_per_pair <= budget


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(k=0), "k must be"),
        (dict(weights=torch.randn(37, 5, dtype=torch.float64)), "weights must be float32"),
        (dict(keys=torch.randn(301, 24, dtype=torch.float64)), "keys must be"),
        (dict(keys=torch.randn(24, 301).T), r"stride\(1\) == 1"),
        (dict(limit=torch.zeros(36, dtype=torch.int64)), "limit must be"),
        (dict(q=torch.randn(37, 24)), "q must be"),
    ],
)
@pytest.mark.parametrize("op", [indexer_topk_reference, indexer_topk_triton])
def test_indexer_topk_rejects_malformed_inputs_with_a_clear_error(gen, op, change, message):
    q, weights, keys, limit = make_inputs(gen, "cpu", 37, 5, 24, 301, torch.float32, random_limits(gen, 37, 301))
    args = dict(q=q, weights=weights, keys=keys, limit=limit, k=16, softmax_scale=SCALE) | change
    with pytest.raises(ValueError, match=message):
        op(**args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_indexer_topk_matches_the_unblocked_topk_at_real_sizes_on_gpu(gen, dtype):
    limit = torch.randint(20000, 40000, (256,), generator=gen)
    inputs = make_inputs(gen, "cuda", 256, 64, 128, 40000, dtype, limit)
    indices, scores = indexer_topk(*inputs, 2048, 128**-0.5, max_buffer_bytes=2**22)
    assert_is_naive_topk(indices, scores, naive_scores(*inputs, 128**-0.5), 2048, TOLS[dtype])
