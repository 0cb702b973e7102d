"""memory_report is measured from the tensors that exist and reflects what LSA dropped."""

import fm_transformers as fm
from tests.conftest import greedy, random_prompt


def test_device_csa_kv_bytes_equal_resident_chunks_times_entry_bytes(indexed_model):
    out = greedy(
        indexed_model, random_prompt(49), max_new_tokens=18, cache_implementation="lsa",
        cache_config={"tau": 4, "threshold": 0.5, "resident_budget": 6, "recency_chunks": 2, "sink_chunks": 1},
    )
    cache = out.past_key_values
    report = cache.memory_report()
    measured = sum(layer.memory()["resident_kv"] + layer.memory()["tail_kv"] for layer in cache.lookahead_layers())
    entry_bytes = indexed_model.config.head_dim * indexed_model.dtype.itemsize
    device = report["device"]
    assert device["csa_resident_kv"] + device["csa_tail_kv"] == measured == report["resident_chunks"] * entry_bytes


def test_threshold_and_budget_put_less_than_full_cache_on_device(indexed_model):
    config = {"tau": 4, "threshold": 0.5, "resident_budget": 0.3, "recency_chunks": 2, "sink_chunks": 1}
    out = greedy(indexed_model, random_prompt(61), max_new_tokens=16, cache_implementation="lsa", cache_config=config)
    report = out.past_key_values.memory_report()
    assert 0 < report["csa_device_ratio"] < 1
    assert report["resident_chunks"] < report["chunks_in_history"]
    assert report["host"]["csa_kv_stored"] == report["full_csa_bytes"] - report["host"]["csa_index_keys_stored"] > 0
    assert report["host"]["allocated"] >= report["host"]["csa_kv_stored"] + report["host"]["csa_index_keys_stored"]
    assert "CSA on device / stock" in fm.format_memory_report(report)


def test_keep_all_ratio_is_one(model):
    cache = fm.OffloadedLookaheadCache(model, {"tau": 4}, policy=fm.KeepAllPolicy())
    out = greedy(model, random_prompt(40), max_new_tokens=9, past_key_values=cache)
    assert abs(out.past_key_values.memory_report()["csa_device_ratio"] - 1.0) < 1e-9
