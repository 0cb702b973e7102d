"""LSA through the transformers entry points users call: generate, pipeline, beam search, reuse, the patch."""

import pytest
import torch
from transformers import pipeline

import fm_transformers as fm
from fm_transformers.tiny import tiny_tokenizer
from tests.conftest import greedy, random_prompt


def test_pipeline_with_lsa_matches_stock(indexed_model):
    generator = pipeline("text-generation", model=indexed_model, tokenizer=tiny_tokenizer())
    prompt = "The quick brown fox jumps over the lazy dog, again and again."
    stock = generator(prompt, max_new_tokens=12, do_sample=False)
    lsa = generator(prompt, max_new_tokens=12, do_sample=False, cache_implementation="lsa", cache_config={"threshold": 0.0, "tau": 4})
    assert lsa[0]["generated_text"] == stock[0]["generated_text"]


def test_beam_search_with_keep_all_matches_stock(indexed_model):
    prompt = random_prompt(35, seed=9)
    stock = indexed_model.generate(prompt, max_new_tokens=10, num_beams=3, do_sample=False)
    lsa = indexed_model.generate(
        prompt, max_new_tokens=10, num_beams=3, do_sample=False, cache_implementation="lsa", cache_config={"threshold": 0.0, "tau": 3}
    )
    assert torch.equal(lsa, stock)


def test_reset_cache_reproduces_the_same_generation(indexed_model):
    cache = fm.OffloadedLookaheadCache(indexed_model, {"tau": 4, "resident_budget": 0.5})
    first = greedy(indexed_model, random_prompt(33), max_new_tokens=10, past_key_values=cache)
    cache.reset()
    second = greedy(indexed_model, random_prompt(33), max_new_tokens=10, past_key_values=cache)
    assert torch.equal(first.sequences, second.sequences)


def test_continuing_a_conversation_reuses_the_cache(model):
    """A second prompt after decode (prefill after decode) gives the stock result."""
    cache = fm.OffloadedLookaheadCache(model, {"tau": 4}, policy=fm.KeepAllPolicy())
    first = greedy(model, random_prompt(30), max_new_tokens=9, past_key_values=cache)
    follow_up = torch.cat([first.sequences, random_prompt(11, seed=5)], dim=1)
    lsa = greedy(model, follow_up, max_new_tokens=6, past_key_values=cache)
    stock = greedy(model, follow_up, max_new_tokens=6)
    assert torch.equal(lsa.sequences, stock.sequences)


def test_patch_is_idempotent_and_removable(indexed_model):
    fm.apply_lsa_patch()
    fm.apply_lsa_patch()
    fm.remove_lsa_patch()
    try:
        from fm_transformers.patch import is_patched

        assert not is_patched()
        with pytest.raises(ValueError, match="cache_implementation"):
            indexed_model.generate(random_prompt(20), max_new_tokens=2, cache_implementation="lsa")
    finally:
        fm.apply_lsa_patch()
    out = indexed_model.generate(random_prompt(20), max_new_tokens=2, cache_implementation="lsa")
    assert out.shape == (1, 22)
