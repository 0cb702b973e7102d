"""cache_config={"preset": "official"}: the paper release's decode settings, overridable key by key."""

import pytest

import fm_transformers as fm
from fm_transformers.config import LSAConfig
from fm_transformers.policies import MemoryIndexerPolicy, PageRecallPolicy
from tests.conftest import INDEXER_LAYERS, greedy, random_prompt


def test_official_preset_has_the_release_decode_settings():
    config = LSAConfig.from_dict({"preset": "official"})
    assert (config.tau, config.recency_chunks, config.sink_chunks, config.page_chunks) == (64, 2048, 0, 64)
    assert config.budget_pages(1024) == 96  # 256K tokens of history
    assert config.resident_budget is None and config.pool_dtype is None


def test_keys_beside_the_preset_override_it():
    config = LSAConfig.from_dict({"preset": "official", "tau": 16, "page_chunks": None, "pool_dtype": "float8_e4m3fn"})
    assert (config.tau, config.page_chunks, config.recency_chunks, config.pool_dtype) == (16, None, 2048, "float8_e4m3fn")
    assert LSAConfig.from_preset("official", page_budget=10).budget_pages(1024) == 10


def test_an_unknown_preset_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown cache_config preset 'offical'; known presets: \['official'\]"):
        LSAConfig.from_dict({"preset": "offical"})


def test_generate_with_the_official_preset_runs_the_memory_indexer_at_threshold_half_over_pages(indexed_model):
    out = greedy(indexed_model, random_prompt(50), max_new_tokens=6, cache_implementation="lsa", cache_config={"preset": "official"})
    policy = out.past_key_values.policy
    assert isinstance(policy, PageRecallPolicy) and policy.page_chunks == 64
    assert isinstance(policy.inner, MemoryIndexerPolicy)
    assert policy.inner.threshold == 0.5 and policy.inner.target_layers == INDEXER_LAYERS  # OR over all of them
    assert out.past_key_values.memory_report()["recalls"] == 1


def test_the_official_preset_works_beside_an_explicit_policy(model):
    cache = fm.OffloadedLookaheadCache(model, {"preset": "official"}, policy=fm.KeepAllPolicy())
    assert isinstance(cache.policy, PageRecallPolicy) and isinstance(cache.policy.inner, fm.KeepAllPolicy)
