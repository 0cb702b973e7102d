"""With nothing dropped, LSA is the stock model: same tokens, logits within 1e-5."""

import pytest
import torch

import fm_transformers as fm
from tests.conftest import greedy, left_padded_batch, max_logit_difference, random_prompt


@pytest.mark.parametrize("prompt_length", [37, 50])  # not multiples of 4, longer than the 16-token window
def test_threshold_zero_matches_stock_generation(indexed_model, prompt_length):
    prompt = random_prompt(prompt_length)
    stock = greedy(indexed_model, prompt)
    lsa = greedy(indexed_model, prompt, cache_implementation="lsa", cache_config={"tau": 8, "threshold": 0.0})
    assert torch.equal(lsa.sequences, stock.sequences)
    assert max_logit_difference(lsa, stock) < 1e-5
    assert lsa.past_key_values.memory_report()["recalls"] >= 3


def test_keep_all_policy_matches_stock_generation(model):
    prompt = random_prompt(41, seed=3)
    stock = greedy(model, prompt, max_new_tokens=30)
    cache = fm.OffloadedLookaheadCache(model, {"tau": 4, "recency_chunks": 0, "sink_chunks": 0}, policy=fm.KeepAllPolicy())
    lsa = greedy(model, prompt, max_new_tokens=30, past_key_values=cache)
    assert torch.equal(lsa.sequences, stock.sequences)
    assert max_logit_difference(lsa, stock) < 1e-5


def test_left_padded_batch_of_different_lengths_matches_stock(indexed_model):
    input_ids, attention_mask = left_padded_batch()
    stock = greedy(indexed_model, input_ids, attention_mask=attention_mask)
    lsa = greedy(
        indexed_model, input_ids, attention_mask=attention_mask, cache_implementation="lsa",
        cache_config={"tau": 8, "threshold": 0.0, "cuda_graph": False},  # test_decode_graph.py covers the graph path
    )
    assert torch.equal(lsa.sequences, stock.sequences)
    assert max_logit_difference(lsa, stock) < 1e-5


def test_batch_sequences_get_different_resident_sets(model):
    """A batch holds one resident set per sequence: an oracle that wants other chunks for each sequence gets
    exactly those (plus recency tail and sink) in every CSA layer."""
    prompt = torch.cat([random_prompt(48, seed=4), random_prompt(48, seed=5)])
    wanted = [torch.tensor([1, 3, 5]), torch.tensor([2, 6, 7, 8])]
    cache = fm.OffloadedLookaheadCache(model, {"tau": 4, "recency_chunks": 1, "sink_chunks": 0}, fm.OraclePolicy([wanted] * 8))
    greedy(model, prompt, max_new_tokens=3, past_key_values=cache)
    for layer in cache.lookahead_layers():
        first, second = layer.resident_ids()
        assert first.tolist() == [1, 3, 5, 11] and second.tolist() == [2, 6, 7, 8, 11]  # chunk 11: the recency tail
