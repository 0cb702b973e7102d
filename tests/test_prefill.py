"""The bounded prefill (prefill.py) against transformers' own eager prefill, and its temporaries' size."""

import pytest
import torch

import fm_transformers as fm
from tests.conftest import DEVICE, LargestTensor, greedy, random_prompt

CHUNK_SIZES = [7, 23, 50]  # not multiples of the CSA rate (4) or of the window (16); the prompt is no multiple of them


def lsa_cache(model):
    return fm.OffloadedLookaheadCache(model, {"tau": 8}, policy=fm.KeepAllPolicy())


@pytest.mark.parametrize("chunk", CHUNK_SIZES)
def test_lsa_prefill_gives_the_stock_eager_logits_and_continuation(eager_model, chunk):
    prompt = random_prompt(203, seed=3)
    stock = greedy(eager_model, prompt, max_new_tokens=16, prefill_chunk_size=chunk)
    lsa = greedy(eager_model, prompt, max_new_tokens=16, prefill_chunk_size=chunk, past_key_values=lsa_cache(eager_model))
    torch.testing.assert_close(lsa.logits[0], stock.logits[0], rtol=0, atol=1e-4)  # the prompt's last token
    assert torch.equal(lsa.sequences, stock.sequences)


def test_lsa_prefill_of_a_left_padded_batch_gives_the_stock_eager_output(eager_model):
    input_ids = torch.cat([random_prompt(97, seed=5), random_prompt(97, seed=6)])
    attention_mask = torch.ones_like(input_ids)
    input_ids[1, :30], attention_mask[1, :30] = 0, 0
    kwargs = dict(max_new_tokens=12, attention_mask=attention_mask, prefill_chunk_size=23)
    stock = greedy(eager_model, input_ids, **kwargs)
    lsa = greedy(eager_model, input_ids, past_key_values=lsa_cache(eager_model), **kwargs)
    torch.testing.assert_close(lsa.logits[0], stock.logits[0], rtol=0, atol=1e-4)
    assert torch.equal(lsa.sequences, stock.sequences)


def test_bounded_prefill_of_the_stock_cache_gives_the_stock_eager_logits(eager_model):
    prompt = random_prompt(150, seed=8)
    stock = greedy(eager_model, prompt, max_new_tokens=4, prefill_chunk_size=37)
    fm.enable_bounded_prefill(eager_model)
    try:
        bounded = greedy(eager_model, prompt, max_new_tokens=4, prefill_chunk_size=37)
    finally:
        fm.enable_bounded_prefill(eager_model, False)
    torch.testing.assert_close(bounded.logits[0], stock.logits[0], rtol=0, atol=1e-4)
    assert torch.equal(bounded.sequences, stock.sequences)


def test_the_pool_after_an_lsa_prefill_equals_the_stock_eager_entries_to_float_rounding(eager_model):
    prompt = random_prompt(130, seed=9)
    stock = greedy(eager_model, prompt, max_new_tokens=1, prefill_chunk_size=29)
    cache = lsa_cache(eager_model)
    greedy(eager_model, prompt, max_new_tokens=1, prefill_chunk_size=29, past_key_values=cache)
    for index in cache.csa_layers:
        for kind in ("compressor", "indexer"):
            pooled, entries = cache.layers[index].pools[kind].read(), stock.past_key_values.layers[index].compressed_kv[kind]
            torch.testing.assert_close(pooled, entries.cpu(), rtol=1e-5, atol=1e-5)


def test_a_prefill_longer_than_its_chunks_recalls_once_when_it_is_over(model):
    cache = fm.OffloadedLookaheadCache(model, {"tau": 8, "resident_budget": 4, "sink_chunks": 1, "recency_chunks": 1}, fm.RecencyPolicy(2))
    greedy(model, random_prompt(120), max_new_tokens=1, prefill_chunk_size=16, past_key_values=cache)
    report = cache.memory_report()
    assert report["recalls"] == 1 and report["chunks_fetched"] == 0  # the whole history was on the device
    assert all(ids.tolist() == [0, 28, 29] for layer in cache.lookahead_layers() for ids in layer.resident_ids())  # sink, newest two


def test_a_second_turn_prefill_after_decode_continues_the_stock_way(model):
    """A prefill that continues a decoded sequence brings the history back once and gives the stock output."""
    first, second = random_prompt(60, seed=11), random_prompt(25, seed=12)
    cache = fm.OffloadedLookaheadCache(model, {"tau": 4, "resident_budget": 5}, fm.RecencyPolicy(1))
    stock_out = greedy(model, first, max_new_tokens=6)
    lsa_out = greedy(model, first, max_new_tokens=6, past_key_values=cache)
    follow = torch.cat([lsa_out.sequences, second], dim=1)
    stock_next = greedy(model, follow, max_new_tokens=6, past_key_values=stock_out.past_key_values)
    lsa_next = greedy(model, follow, max_new_tokens=1, past_key_values=cache)
    assert torch.equal(lsa_out.sequences, stock_out.sequences)
    torch.testing.assert_close(lsa_next.logits[0], stock_next.logits[0], rtol=0, atol=1e-4)


def largest_prefill_tensor(model, length: int, chunk: int) -> int:
    cache = lsa_cache(model)
    with torch.no_grad(), LargestTensor() as mode:
        model.generate(random_prompt(length, seed=1), max_new_tokens=1, do_sample=False, pad_token_id=0,
                       prefill_chunk_size=chunk, past_key_values=cache)
    return mode.largest


@pytest.mark.skipif(DEVICE.type != "cpu", reason="counts the CPU path's temporaries")
def test_no_prefill_temporary_grows_with_chunk_times_history(model):
    """Four times the history, the same chunk: a (chunk x history) tensor would be 4x larger (here it would be
    the largest tensor by far: 512 x 4096 entries at the longer prompt); a bounded prefill's largest tensor
    stays the same size."""
    short = largest_prefill_tensor(model, 4096, chunk=512)
    long = largest_prefill_tensor(model, 16384, chunk=512)
    assert long <= 1.25 * short, (short, long)
