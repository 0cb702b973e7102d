"""Wrong input fails early with a message that says what was wrong."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fm_transformers as fm
from fm_transformers.tiny import tiny_deepseek_v4
from tests.conftest import random_prompt


@pytest.fixture(scope="module")
def llama():
    config = LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)
    return LlamaForCausalLM(config).eval()


def test_model_that_is_not_deepseek_v4_is_refused(llama, model):
    indexer = fm.MemoryIndexerModel.from_backbone(model, layers=[2], num_heads=4, rank=8)
    with pytest.raises(ValueError, match="DeepSeek-V4"):
        fm.attach_memory_indexer(llama, indexer)
    with pytest.raises(ValueError, match="DeepSeek-V4"):
        fm.OffloadedLookaheadCache(llama)
    with pytest.raises(ValueError, match="DeepSeek-V4"):
        llama.generate(torch.randint(0, 99, (1, 5)), max_new_tokens=2, cache_implementation="lsa")
    with pytest.raises(ValueError, match="DeepSeek-V4"):
        fm.MemoryIndexerModel.from_backbone(llama, layers=[0])


def test_indexer_layer_that_is_not_csa_is_refused(model):
    with pytest.raises(ValueError, match=r"not CSA layers.*\[2, 4, 6, 7\]"):
        fm.MemoryIndexerModel.from_backbone(model, layers=[3], num_heads=4, rank=8)
    with pytest.raises(ValueError, match="default target layers"):
        fm.MemoryIndexerModel.from_backbone(model)


def test_indexer_made_for_other_dimensions_is_refused(model):
    other = tiny_deepseek_v4(hidden_size=48)
    indexer = fm.MemoryIndexerModel.from_backbone(other, layers=[2], num_heads=4, rank=8)
    with pytest.raises(ValueError, match="hidden_size=48.*model has hidden_size=64: load the indexer made for this backbone"):
        fm.attach_memory_indexer(model, indexer)
    assert fm.attached_memory_indexer(model) is None


@pytest.mark.parametrize(
    "options, message",
    [
        ({"tau": 0}, "tau must be a positive integer"),
        ({"tau": -3}, "tau must be a positive integer"),
        ({"threshold": 1.5}, r"threshold must lie in \[0, 1\]"),
        ({"threshold": -0.1}, r"threshold must lie in \[0, 1\]"),
        ({"resident_budget": 0}, "resident_budget"),
        ({"resident_budget": 1.5}, "resident_budget"),
        ({"pool_dtype": "int8"}, "pool_dtype"),
        ({"refresh_layers": 2}, "refresh_layers must be a non-empty list of layer indices"),
        ({"refresh_layers": [3]}, r"refresh_layers \[3\] are not CSA layers"),
        ({"taus": 8}, r"unknown cache_config key\(s\) \['taus'\]"),
    ],
)
def test_bad_cache_config_is_refused_by_generate(indexed_model, options, message):
    with pytest.raises(ValueError, match=message):
        indexed_model.generate(random_prompt(20), max_new_tokens=2, cache_implementation="lsa", cache_config=options)


def test_generate_without_attached_indexer_names_attach_memory_indexer(model):
    with pytest.raises(ValueError, match="attach_memory_indexer"):
        model.generate(random_prompt(20), max_new_tokens=2, cache_implementation="lsa")


def test_indexer_layers_without_memory_indexer_are_refused(indexed_model):
    with pytest.raises(ValueError, match=r"indexer_layers \[6\] have no memory indexer"):
        indexed_model.generate(random_prompt(20), max_new_tokens=2, cache_implementation="lsa", cache_config={"indexer_layers": [6]})
