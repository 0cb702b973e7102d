"""Page-granular recall: the densest pages of the policy's chunks, recalled whole, within a page budget."""

import pytest
import torch

import fm_transformers as fm
from fm_transformers.config import LSAConfig
from fm_transformers.policies import PageRecallPolicy, SelectionContext, policy_from_config, resident_sets
from tests.conftest import greedy, max_logit_difference, random_prompt


def context_for(num_chunks, batch=1):
    return SelectionContext(num_chunks, torch.full((batch,), num_chunks), trigger_index=0, device=torch.device("cpu"))


def paged_resident_sets(wanted_per_sequence, num_chunks, **options):
    """Resident sets of a PageRecallPolicy around an oracle that wants `wanted_per_sequence` (one id list per
    sequence), under LSAConfig(**options), as lists of chunk ids."""
    config = LSAConfig(**options)
    oracle = fm.OraclePolicy([[torch.tensor(ids) for ids in wanted_per_sequence]])
    policy = PageRecallPolicy(oracle, config.page_chunks, config.budget_pages, config.recency_chunks, config.sink_chunks)
    context = context_for(num_chunks, len(wanted_per_sequence))
    return [ids.tolist() for ids in resident_sets(policy.priorities(context), context, config)]


def page(index, size=4):
    return list(range(index * size, (index + 1) * size))


def test_the_densest_pages_are_recalled_whole():
    # 10 pages of 4 chunks; page 7 holds 4 wanted chunks, page 2 three, page 5 two, page 8 one.
    wanted = [9, 10, 11, 21, 22, 28, 29, 30, 31, 33]
    (got,) = paged_resident_sets([wanted], 40, page_chunks=4, page_budget=2, recency_chunks=0, sink_chunks=0)
    assert got == page(2) + page(7)


def test_the_page_budget_caps_the_pages_and_equal_densities_keep_the_lower_page():
    wanted = [1, 5, 9, 13, 17]  # one chunk in each of pages 0-4
    (got,) = paged_resident_sets([wanted], 40, page_chunks=4, page_budget=3, recency_chunks=0, sink_chunks=0)
    assert got == page(0) + page(1) + page(2)


def test_recency_and_sink_pages_are_whole_and_count_against_the_budget():
    wanted = [9, 10, 11, 21, 22, 28, 29, 30, 31]  # pages 2 (3), 5 (2), 7 (4)
    # Sink chunk 0 forces page 0; recency chunks 35-39 force pages 8 and 9: three of the four pages.
    (got,) = paged_resident_sets([wanted], 40, page_chunks=4, page_budget=4, recency_chunks=5, sink_chunks=1)
    assert got == page(0) + page(7) + page(8) + page(9)
    # A budget below the forced pages still keeps them (the tail and the sink are always resident).
    (got,) = paged_resident_sets([wanted], 40, page_chunks=4, page_budget=1, recency_chunks=5, sink_chunks=1)
    assert got == page(0) + page(8) + page(9)


def test_pages_without_a_wanted_chunk_are_not_recalled_and_a_partial_last_page_stays_in_range():
    (got,) = paged_resident_sets([[37]], 38, page_chunks=4, page_budget=5, recency_chunks=0, sink_chunks=0)
    assert got == [36, 37]  # the last page holds chunks 36 and 37 only; nothing else is wanted


def test_each_sequence_gets_its_own_densest_pages():
    wanted = [[0, 1, 2, 30], [13, 29, 30, 31]]
    got = paged_resident_sets(wanted, 40, page_chunks=4, page_budget=1, recency_chunks=0, sink_chunks=0)
    assert got == [page(0), page(7)]


def test_a_fractional_page_budget_is_the_release_page_count_at_256k_512k_and_1m():
    config = LSAConfig(page_chunks=64)  # page_budget None: DEFAULT_PAGE_BUDGET
    pages_at = lambda tokens: tokens // 4 // 64  # noqa: E731  (4 tokens a chunk, 64 chunks a page)
    assert [config.budget_pages(pages_at(n)) for n in (2**18, 2**19, 2**20)] == [96, 192, 384]
    assert config.budget_pages(3) == 1  # rounded up: a short history still recalls a page
    assert LSAConfig(page_chunks=4, page_budget=0.5).budget_pages(5) == 3


def test_chunk_granular_config_leaves_the_policy_unwrapped(model):
    keep_all = fm.KeepAllPolicy()
    assert policy_from_config(model, LSAConfig(), keep_all) is keep_all
    wrapped = policy_from_config(model, LSAConfig(page_chunks=8), keep_all)
    assert isinstance(wrapped, PageRecallPolicy) and wrapped.inner is keep_all


def test_keep_all_with_page_recall_over_every_page_matches_stock_generation(model):
    prompt = random_prompt(41, seed=3)
    stock = greedy(model, prompt, max_new_tokens=30)
    config = {"tau": 4, "recency_chunks": 0, "sink_chunks": 0, "page_chunks": 4, "page_budget": 1.0}
    cache = fm.OffloadedLookaheadCache(model, config, policy=fm.KeepAllPolicy())
    lsa = greedy(model, prompt, max_new_tokens=30, past_key_values=cache)
    assert torch.equal(lsa.sequences, stock.sequences)
    assert max_logit_difference(lsa, stock) < 1e-5
    assert cache.memory_report()["resident_chunks"] == cache.memory_report()["chunks_in_history"]


def test_recall_of_a_page_fetches_exactly_its_chunks_from_the_pool(model):
    """Prompt of 48 tokens: 12 chunks, pages of 4. After the prefill the oracle wants chunk 1 (page 0); 4 decode
    steps later chunk 5 (page 1), which is on the device nowhere: its 4 chunks, one contiguous range per pool
    (compressed KV, indexer keys), come from the pool into the slots the candidates address."""
    sets = [[torch.tensor([1])], [torch.tensor([5])]] + [[torch.tensor([5])]] * 4
    config = {"tau": 4, "recency_chunks": 1, "sink_chunks": 0, "page_chunks": 4, "page_budget": 1.0}
    cache = fm.OffloadedLookaheadCache(model, config, fm.OraclePolicy(sets))
    greedy(model, random_prompt(48, seed=6), max_new_tokens=5, past_key_values=cache)
    for layer in cache.lookahead_layers():
        assert layer.recalls == 2
        assert layer.resident_ids()[0].tolist() == page(1) + [12]  # page 1, and chunk 12: the recency tail then
        assert layer.chunks_fetched == 4 and layer.memory()["ranges_fetched"] == 2
        slots, chunk_ids = layer.level2_candidates()
        resident = chunk_ids[0] < 8
        pooled = layer.pools["compressor"].read()[0, chunk_ids[0, resident].cpu()]
        assert torch.equal(layer.kv_table()[slots[0, resident]].cpu(), pooled)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"page_chunks": 0}, "page_chunks must be a positive integer"),
        ({"page_budget": 4}, "page_budget=4 needs page recall: set page_chunks"),
        ({"page_chunks": 64, "page_budget": 0}, "page_budget as a page count must be >= 1"),
        ({"page_chunks": 64, "page_budget": 1.5}, r"page_budget as a fraction .* must lie in \(0, 1\]"),
    ],
)
def test_bad_page_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        LSAConfig.from_dict(options)
