"""Refresh on a miss: refresh layers fetch the chunks their native top-k wants at once, within the budget."""

import torch

import fm_transformers as fm
from tests.conftest import greedy, max_logit_difference, random_prompt

PROMPT_LENGTH = 201  # 50 chunks, more than the native top-k of 6 per layer and step
NEW_TOKENS = 24
CSA_LAYERS = (2, 4, 6, 7)


def lsa_run(model, prompt, policy, **options):
    config = {"tau": 8, "recency_chunks": 0, "sink_chunks": 0, **options}
    cache = fm.OffloadedLookaheadCache(model, config, policy)
    return greedy(model, prompt, max_new_tokens=NEW_TOKENS, past_key_values=cache), cache.memory_report()


def test_refresh_at_every_csa_layer_gives_the_stock_output_from_an_empty_resident_set(model):
    """Level 1 wants nothing (only the chunks made since the last trigger are candidates), so every chunk
    the native top-k uses below the horizon must come from a refresh."""
    prompt = random_prompt(PROMPT_LENGTH, seed=7)
    stock = greedy(model, prompt, max_new_tokens=NEW_TOKENS)
    refreshed, report = lsa_run(model, prompt, fm.RecencyPolicy(window=0), refresh_layers=CSA_LAYERS)
    assert torch.equal(refreshed.sequences, stock.sequences)
    assert max_logit_difference(refreshed, stock) < 1e-5
    assert report["refreshes"] > 0
    without, report = lsa_run(model, prompt, fm.RecencyPolicy(window=0))
    assert report["refreshes"] == 0
    assert max_logit_difference(without, stock) > 1e-3


def test_refresh_keeps_the_resident_set_within_the_budget(model):
    prompt = random_prompt(PROMPT_LENGTH, batch=2, seed=3)
    config = {"refresh_layers": (2,), "resident_budget": 4}
    cache = fm.OffloadedLookaheadCache(model, {"tau": 8, "recency_chunks": 0, "sink_chunks": 0, **config}, fm.RecencyPolicy(0))
    resident_sizes = []
    original = cache.refresh_on_miss

    def record(layer_idx, picks):
        original(layer_idx, picks)
        resident_sizes.append(max(ids.numel() for ids in cache.layers[layer_idx].resident_ids()))

    cache.refresh_on_miss = record
    greedy(model, prompt, max_new_tokens=NEW_TOKENS, past_key_values=cache)
    assert len(resident_sizes) == NEW_TOKENS - 1 and max(resident_sizes) == 4
    report = cache.memory_report()
    assert report["refreshes"] > 0 and report["chunks_fetched"] > 0


def test_refresh_layers_keep_their_index_keys_on_the_device_in_full(model):
    cache = fm.OffloadedLookaheadCache(model, {"refresh_layers": [6]}, fm.RecencyPolicy(0))
    assert [layer.keep_index_keys_on_device for layer in cache.lookahead_layers()] == [False, False, True, False]


def test_beam_search_with_refresh_matches_stock(model):
    prompt = random_prompt(120, seed=9)
    stock = model.generate(prompt, max_new_tokens=10, num_beams=3, do_sample=False)
    config = {"tau": 3, "recency_chunks": 0, "sink_chunks": 0, "refresh_layers": CSA_LAYERS}
    cache = fm.OffloadedLookaheadCache(model, config, fm.RecencyPolicy(0))
    lsa = model.generate(prompt, max_new_tokens=10, num_beams=3, do_sample=False, past_key_values=cache)
    assert torch.equal(lsa, stock)


def test_generate_with_refresh_layers_in_cache_config_matches_stock(indexed_model):
    """Without a budget a refresh only adds chunks, so whatever the memory indexer keeps, each layer sees its
    whole native top-k."""
    prompt = random_prompt(PROMPT_LENGTH, seed=5)
    stock = greedy(indexed_model, prompt, max_new_tokens=NEW_TOKENS)
    options = {"tau": 4, "threshold": 0.9, "recency_chunks": 0, "sink_chunks": 0, "refresh_layers": list(CSA_LAYERS)}
    lsa = greedy(indexed_model, prompt, max_new_tokens=NEW_TOKENS, cache_implementation="lsa", cache_config=options)
    assert torch.equal(lsa.sequences, stock.sequences)
    assert max_logit_difference(lsa, stock) < 1e-5
    options.pop("refresh_layers")
    without = greedy(indexed_model, prompt, max_new_tokens=NEW_TOKENS, cache_implementation="lsa", cache_config=options)
    assert max_logit_difference(without, stock) > 1e-3


def test_left_padded_batch_with_refresh_matches_stock(indexed_model):
    """Each sequence refreshes with its own top-k over its own visible chunks (padding included, as stock)."""
    long_prompt, short_prompt = random_prompt(150, seed=1)[0], random_prompt(110, seed=2)[0]
    input_ids = torch.zeros(2, 150, dtype=torch.long, device=long_prompt.device)
    attention_mask = torch.zeros_like(input_ids)
    input_ids[0], attention_mask[0] = long_prompt, 1
    input_ids[1, 40:], attention_mask[1, 40:] = short_prompt, 1
    stock = greedy(indexed_model, input_ids, attention_mask=attention_mask)
    options = {"tau": 8, "threshold": 0.9, "recency_chunks": 0, "sink_chunks": 0, "refresh_layers": list(CSA_LAYERS)}
    lsa = greedy(indexed_model, input_ids, attention_mask=attention_mask, cache_implementation="lsa", cache_config=options)
    assert torch.equal(lsa.sequences, stock.sequences)
    assert max_logit_difference(lsa, stock) < 1e-5
    assert lsa.past_key_values.memory_report()["refreshes"] > 0
