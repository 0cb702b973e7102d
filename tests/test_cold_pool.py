"""The cold pool always equals what the stock cache holds, byte for byte, and grows without copying."""

import torch
from transformers import DynamicCache

import fm_transformers as fm
from fm_transformers.cold_pool import ColdPool
from tests.conftest import greedy, random_prompt


def assert_pools_equal_stock(lsa_cache, stock_cache, layers=None):
    for index in layers or lsa_cache.csa_layers:
        lsa_layer, stock_layer = lsa_cache.layers[index], stock_cache.layers[index]
        for kind in ("compressor", "indexer"):
            pooled, stock = lsa_layer.pools[kind].read(), stock_layer.compressed_kv[kind]
            assert pooled.shape == stock.shape
            assert torch.equal(pooled.view(torch.uint8), stock.cpu().contiguous().view(torch.uint8))


def test_cold_pool_equals_stock_cache_after_prefill(indexed_model):
    prompt = random_prompt(43, batch=2)
    stock_cache = DynamicCache(config=indexed_model.config)
    lsa_cache = fm.OffloadedLookaheadCache(indexed_model)
    with torch.no_grad():
        indexed_model(prompt, past_key_values=stock_cache)
        indexed_model(prompt, past_key_values=lsa_cache)
    assert_pools_equal_stock(lsa_cache, stock_cache)


def stock_generate_following(model, prompt, sequences):
    """The cache of a stock `generate` forced onto `sequences`: the same generate code path (attention mask,
    positions) as the LSA run, so every layer before the first CSA layer computes exactly what it computed."""
    new_tokens = sequences[:, prompt.shape[1] :].tolist()

    def allowed(batch_id, tokens):
        return [new_tokens[batch_id][tokens.shape[0] - prompt.shape[1]]]

    out = greedy(model, prompt, max_new_tokens=len(new_tokens[0]), prefix_allowed_tokens_fn=allowed)
    assert torch.equal(out.sequences, sequences)
    return out.past_key_values


def test_cold_pool_equals_stock_cache_after_decode(model):
    """Against a stock `generate` with the same settings (same tokens under keep-all, same code path up to
    the first CSA layer), the first CSA layer is byte-exact. Deeper layers' inputs went through sparse
    attention, which sums the same terms in another order than the stock eager attention, so they agree
    to float32 rounding."""
    prompt = random_prompt(43, seed=2)
    cache = fm.OffloadedLookaheadCache(model, {"tau": 4}, policy=fm.KeepAllPolicy())
    out = greedy(model, prompt, max_new_tokens=20, past_key_values=cache)
    stock = greedy(model, prompt, max_new_tokens=20)
    assert torch.equal(out.sequences, stock.sequences)
    stock_cache = stock.past_key_values
    assert_pools_equal_stock(out.past_key_values, stock_cache, layers=cache.csa_layers[:1])
    for index in cache.csa_layers[1:]:
        for kind in ("compressor", "indexer"):
            pooled, stock = cache.layers[index].pools[kind].read(), stock_cache.layers[index].compressed_kv[kind]
            torch.testing.assert_close(pooled, stock.cpu(), rtol=1e-5, atol=1e-5)


def test_cold_pool_keeps_dropped_chunks_exactly(indexed_model):
    """With chunks dropped, deeper layers see other hidden states than a stock run; the first CSA layer's
    inputs depend on the tokens only, so its pool must still equal the stock cache byte for byte."""
    prompt = random_prompt(43, seed=2)
    # eager decode: through the CUDA graph the sliding layers' attention sums in another order than stock's
    # (equal to rounding, tests/test_decode_graph.py), so the first CSA layer's inputs are not byte-identical
    config = {"tau": 4, "threshold": 0.5, "resident_budget": 0.25, "recency_chunks": 1, "sink_chunks": 1, "cuda_graph": False}
    out = greedy(indexed_model, prompt, max_new_tokens=20, cache_implementation="lsa", cache_config=config)
    assert out.past_key_values.memory_report()["chunks_fetched"] > 0
    stock_cache = stock_generate_following(indexed_model, prompt, out.sequences)
    assert_pools_equal_stock(out.past_key_values, stock_cache, layers=out.past_key_values.csa_layers[:1])


def test_cold_pool_grows_without_copying_stored_slabs():
    pool = ColdPool(batch_size=2, dim=5, dtype=torch.float32, pin_memory=False, slab_chunks=4)
    first = torch.randn(2, 3, 5)
    pool.append(first)
    first_slab = pool.slabs[0].data_ptr()
    second = torch.randn(2, 7, 5)
    pool.append(second)
    assert pool.slabs[0].data_ptr() == first_slab and len(pool.slabs) == 3
    assert torch.equal(pool.read(), torch.cat([first, second], dim=1))


def test_cold_pool_fetches_chunks_of_any_sequence_across_slabs_into_given_rows():
    pool = ColdPool(batch_size=2, dim=5, dtype=torch.float32, pin_memory=False, slab_chunks=4)
    entries = torch.randn(2, 10, 5)
    pool.append(entries)
    rows, ids, dst_rows = torch.tensor([1, 0, 1, 0]), torch.tensor([9, 0, 4, 5]), torch.tensor([3, 0, 5, 1])
    dst = torch.zeros(6, 5)
    read = pool.fetch_into(rows, ids, dst, dst_rows)
    assert torch.equal(dst[dst_rows], entries[rows, ids])
    assert torch.equal(dst[[2, 4]], torch.zeros(2, 5))  # rows not asked for stay untouched
    assert len(read) == 3  # every slab touched, kept alive until the copies ran
