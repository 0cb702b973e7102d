"""The hot set: one slot table per kind with the tail appended in place, and recalls that fetch only what changed."""

import pytest
import torch

import fm_transformers as fm
from fm_transformers.cold_pool import ColdPool
from fm_transformers.pool import HotSet
from tests.conftest import random_prompt

DIM, BATCH = 6, 2


def hot_set_with_pool(chunks: int, reserve: int = 4):
    """A hot set whose tail holds `chunks` chunks of two sequences, all of them also in the pool."""
    pool = ColdPool(BATCH, DIM, torch.float32, pin_memory=False, slab_chunks=3)
    hot = HotSet({"kv": DIM}, BATCH, torch.device("cpu"), torch.float32, tail_reserve=reserve)
    entries = torch.randn(BATCH, chunks, DIM)
    pool.append(entries)
    hot.append_tail("kv", entries)
    fetch = lambda kind, *where: pool.fetch_into(*where)  # noqa: E731
    return hot, pool, entries, fetch


def candidate_entries(hot):
    """(batch, candidates, dim) read through candidates() and the table, and the candidate chunk ids."""
    slot_index, chunk_ids = hot.candidates()
    return hot.table("kv")[slot_index.clamp(min=0)], chunk_ids


def assert_candidates_hold_their_chunks(hot, entries):
    got, chunk_ids = candidate_entries(hot)
    for row in range(BATCH):
        valid = chunk_ids[row] >= 0
        assert torch.equal(got[row, valid], entries[row, chunk_ids[row, valid]])


def test_recall_keeps_chosen_chunks_and_the_tail_past_the_horizon():
    hot, _, entries, fetch = hot_set_with_pool(10)
    fetched = hot.recall([torch.tensor([0, 3, 7]), torch.tensor([2])], horizon=8, fetch=fetch)
    assert fetched == 0  # everything chosen was in the tail already
    assert hot.tail_start == 8 and hot.tail_length == 2 and hot.resident_count() == 4 + 2 * BATCH
    _, chunk_ids = hot.candidates()
    assert chunk_ids[0].tolist() == [0, 3, 7, 8, 9] and chunk_ids[1].tolist() == [2, 8, 9, -1, -1]
    assert_candidates_hold_their_chunks(hot, entries)


def test_second_recall_fetches_only_the_chunks_that_changed():
    hot, _, entries, fetch = hot_set_with_pool(10)
    hot.recall([torch.tensor([0, 3]), torch.tensor([2, 5])], horizon=10, fetch=fetch)
    fetched = hot.recall([torch.tensor([0, 1, 3, 4]), torch.tensor([5, 9])], horizon=10, fetch=fetch)
    assert fetched == 3  # 1 and 4 of sequence 0, 9 of sequence 1; 0, 3 and 5 stay on the device
    assert_candidates_hold_their_chunks(hot, entries)


def test_random_recalls_and_appends_keep_every_candidate_equal_to_its_pool_entry():
    """Uneven sets per sequence (some empty), horizons that move or stay (a refresh), chunks appended between:
    after each recall every candidate reads its own entry and only chunks that were on no row are fetched."""
    generator = torch.Generator().manual_seed(0)
    batch = 3
    pool = ColdPool(batch, DIM, torch.float32, pin_memory=False, slab_chunks=4)
    hot = HotSet({"kv": DIM}, batch, torch.device("cpu"), torch.float32, tail_reserve=2)
    fetch = lambda kind, *where: pool.fetch_into(*where)  # noqa: E731
    entries = torch.empty(batch, 0, DIM)
    horizon = 0
    for _ in range(30):
        new = torch.randn(batch, int(torch.randint(0, 4, (), generator=generator)), DIM, generator=generator)
        pool.append(new)
        hot.append_tail("kv", new)
        entries = torch.cat([entries, new], dim=1)
        if torch.rand((), generator=generator) < 0.6:
            horizon = entries.shape[1]  # a trigger; otherwise a refresh under the same horizon
        on_device = [
            set(ids.tolist()) | set(range(hot.tail_start, hot.tail_start + hot.tail_length)) for ids in hot.chunk_ids
        ]
        new_ids = [
            torch.randperm(horizon, generator=generator)[: int(torch.randint(0, horizon + 1, (), generator=generator))]
            .sort()
            .values
            for _ in range(batch)
        ]
        expected = sum(len(set(ids.tolist()) - on_device[row]) for row, ids in enumerate(new_ids))
        assert hot.recall(new_ids, horizon, fetch) == expected
        assert [ids.tolist() for ids in hot.chunk_ids] == [ids.tolist() for ids in new_ids]
        got, chunk_ids = candidate_entries(hot)
        for row in range(batch):
            valid = chunk_ids[row] >= 0
            assert torch.equal(got[row, valid], entries[row, chunk_ids[row, valid]])
            assert chunk_ids[row, valid].tolist() == new_ids[row].tolist() + list(range(horizon, entries.shape[1]))


def test_fetched_ranges_count_runs_of_consecutive_chunks_of_one_sequence():
    """Fetched: 2-4 and 9 of sequence 0, 0-1 of sequence 1: three ranges per kind (9, the last id below the
    horizon, and 0 of the next sequence are not one range)."""
    pool = ColdPool(BATCH, DIM, torch.float32, pin_memory=False, slab_chunks=4)
    hot = HotSet({"kv": DIM, "keys": DIM}, BATCH, torch.device("cpu"), torch.float32, tail_reserve=2)
    pool.append(torch.randn(BATCH, 10, DIM))
    fetch = lambda kind, *where: pool.fetch_into(*where)  # noqa: E731
    assert hot.recall([torch.tensor([2, 3, 4, 9]), torch.tensor([0, 1])], horizon=10, fetch=fetch) == 6
    assert int(hot.fetched_ranges) == 3 * 2
    hot.recall([torch.tensor([2, 3, 4, 5, 6]), torch.tensor([0, 1])], horizon=10, fetch=fetch)  # fetches 5-6
    assert int(hot.fetched_ranges) == 3 * 2 + 1 * 2


def test_tail_grows_in_place_within_its_reserve():
    hot, pool, entries, fetch = hot_set_with_pool(6, reserve=3)
    hot.recall([torch.tensor([1]), torch.tensor([4, 5])], horizon=6, fetch=fetch)
    table = hot.table("kv")
    assert table.shape[0] == 3 + 3 * BATCH  # resident rows + the reserve for the tail
    for _ in range(3):
        new = torch.randn(BATCH, 1, DIM)
        pool.append(new)
        hot.append_tail("kv", new)
        entries = torch.cat([entries, new], dim=1)
    assert hot.table("kv").data_ptr() == table.data_ptr()  # appended in place, the table was never copied
    assert hot.tail_length == 3 and torch.equal(hot.tail("kv"), entries[:, 6:])
    assert_candidates_hold_their_chunks(hot, entries)
    beyond = torch.randn(BATCH, 1, DIM)
    hot.append_tail("kv", beyond)  # past the reserve: the table grows, the contents stay
    assert torch.equal(hot.tail("kv"), torch.cat([entries[:, 6:], beyond], dim=1))


def test_recall_converts_chunks_from_a_pool_kept_in_another_dtype():
    pool = ColdPool(BATCH, DIM, torch.float16, pin_memory=False, slab_chunks=3)
    hot = HotSet({"kv": DIM}, BATCH, torch.device("cpu"), torch.float32, tail_reserve=2)
    entries = torch.randn(BATCH, 8, DIM)
    pool.append(entries)
    hot.append_tail("kv", entries)
    hot.recall([torch.tensor([1]), torch.tensor([2])], horizon=8, fetch=lambda kind, *where: pool.fetch_into(*where))
    hot.recall(
        [torch.tensor([1, 5]), torch.tensor([0, 7])], horizon=8, fetch=lambda kind, *where: pool.fetch_into(*where)
    )
    got, chunk_ids = candidate_entries(hot)
    assert got.dtype == torch.float32
    assert torch.equal(got[0, 0], entries[0, 1])  # stayed on the device since it was made
    assert torch.equal(got[0, 1], entries[0, 5].half().float())  # came back from the float16 pool
    assert torch.equal(got[1], entries[1, [0, 7]].half().float())


def test_recall_into_a_fresh_hot_set_fetches_every_chunk_from_the_pool():
    """Chunks past tail_start that never entered this hot set's tail (a hot set made after the pool filled)
    come from the pool, not from tail rows that do not exist."""
    pool = ColdPool(BATCH, DIM, torch.float32, pin_memory=False, slab_chunks=3)
    hot = HotSet({"kv": DIM}, BATCH, torch.device("cpu"), torch.float32, tail_reserve=2)
    entries = torch.randn(BATCH, 12, DIM)
    pool.append(entries)
    fetch = lambda kind, *where: pool.fetch_into(*where)  # noqa: E731
    assert hot.recall([torch.tensor([1, 5, 11]), torch.tensor([0, 4])], horizon=12, fetch=fetch) == 5
    assert_candidates_hold_their_chunks(hot, entries)


def test_reorder_keeps_each_sequence_with_its_chunks():
    hot, _, entries, fetch = hot_set_with_pool(8)
    hot.recall([torch.tensor([0, 2]), torch.tensor([1, 4, 6])], horizon=7, fetch=fetch)
    hot.reorder(torch.tensor([1, 1, 0]))
    got, chunk_ids = candidate_entries(hot)
    expected = entries[[1, 1, 0]]
    for row in range(3):
        valid = chunk_ids[row] >= 0
        assert torch.equal(got[row, valid], expected[row, chunk_ids[row, valid]])
    assert chunk_ids[0].tolist() == [1, 4, 6, 7] and chunk_ids[2].tolist() == [0, 2, 7, -1]


def test_recall_starts_at_the_trigger_so_copies_can_overlap_what_follows(model):
    """The resident set is fetched when level 1 decides it: after a prefill as soon as it is over (generate
    calls finish_prefill, a decode step does too), so the whole history leaves the device; the next forward
    only waits for copies queued meanwhile."""
    cache = fm.OffloadedLookaheadCache(
        model, {"tau": 4, "resident_budget": 5, "recency_chunks": 1, "sink_chunks": 1}, fm.RecencyPolicy(2)
    )
    with torch.no_grad():
        model(random_prompt(41), past_key_values=cache)
    assert all(layer.recalls == 0 for layer in cache.lookahead_layers())  # a prefill may go on: nothing recalled yet
    cache.finish_prefill()
    for layer in cache.lookahead_layers():
        assert layer.recalls == 1 and layer.has_resident_set
        assert layer.resident_ids()[0].tolist() == [0, 8, 9]  # sink, recency window of 2
        assert layer.memory()["tail_kv"] == 0  # the prefill's device copy is already gone


@pytest.mark.gpu
def test_recall_copies_run_on_the_copy_stream_and_the_next_use_waits_for_them():
    stream = torch.cuda.Stream()
    pool = ColdPool(BATCH, 512, torch.bfloat16, pin_memory=True, slab_chunks=1024)
    hot = HotSet({"kv": 512}, BATCH, torch.device("cuda"), torch.bfloat16, tail_reserve=4, copy_stream=stream)
    entries = torch.randn(BATCH, 50_000, 512, dtype=torch.bfloat16)
    pool.append(entries)
    fetch = lambda kind, *where: pool.fetch_into(*where)  # noqa: E731
    ids = [torch.randperm(50_000)[:20_000].sort().values for _ in range(BATCH)]
    assert hot.recall(ids, horizon=50_000, fetch=fetch) == 2 * 20_000
    assert hot._in_flight is not None  # host memory of the fetch is held until the copies are done
    got, chunk_ids = candidate_entries(hot)  # waits on the recall's event before reading
    for row in range(BATCH):
        assert torch.equal(got[row].cpu(), entries[row, chunk_ids[row].cpu()])
    hot.finish()
    assert hot._in_flight is None
