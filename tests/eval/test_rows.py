"""The pieces behind the comparison's rows, on synthetic inputs: matched sizes, oracle windows, phase peaks."""

import gc
import weakref

import pytest
import torch

from fm_transformers.config import LSAConfig
from fm_transformers.eval.matched import MatchedPolicy, matched_counts
from fm_transformers.eval.measures import PhasePeaks, host_syncs, phase_peaks
from fm_transformers.eval.oracle import lookahead_sets
from fm_transformers.policies import SelectionContext, resident_sets


def context(chunks, batch=2, trigger=0):
    return SelectionContext(chunks, torch.full((batch,), chunks), trigger, torch.device("cpu"))


def test_matched_counts_add_the_bytes_lsa_spent_on_whole_history_index_keys():
    counts = matched_counts({1: (100, [10, 100]), 0: (50, [50, 5])}, csa_layers=7, target_layers=3, kv=256, ix=32)
    assert counts == [[50, 5 + 3 * 32 * 45 // (7 * 288)], [10 + 3 * 32 * 90 // (7 * 288), 100]]


@pytest.mark.parametrize("kind", ["recency", "random"])
def test_a_matched_policy_keeps_exactly_the_recorded_count_with_the_tail_and_sink(kind):
    config = LSAConfig(recency_chunks=3, sink_chunks=2)
    policy = MatchedPolicy(kind, [[10, 4]], config, seed=1)
    kept = resident_sets(policy.priorities(context(40)), context(40), config)
    assert [ids.numel() for ids in kept] == [10, 5]  # 5: the tail and the sink alone
    assert all({0, 1, 37, 38, 39} <= set(ids.tolist()) for ids in kept)
    if kind == "recency":
        assert kept[0].tolist() == [0, 1, 32, 33, 34, 35, 36, 37, 38, 39]
    with pytest.raises(RuntimeError, match="no recorded LSA size"):
        policy.priorities(context(40, trigger=1))


def test_oracle_windows_follow_the_recall_schedule_and_keep_the_most_picked_under_a_budget():
    # prompt of 40 tokens (10 chunks), tau 2, 4 decode forwards; one sequence, picks of forward f = [f, f + 4]
    steps = [torch.tensor([[f, f + 4, -1]]) for f in range(1, 5)]
    sets = lookahead_sets(steps, tau=2, prompt_length=40, compress_rate=4, config=LSAConfig(recency_chunks=0, sink_chunks=0))
    assert [s[0].tolist() for s in sets] == [[6, 5, 2, 1], [8, 7, 4, 3], []]  # forwards 1-2, 3-4, none left
    repeated = [torch.tensor([[3, 3, 7]]), torch.tensor([[3, 9, 7]])]
    for budget, expected in ((4, [3, 7]), (2, [3])):  # 9 is the recency tail, kept anyway; then most picked first
        capped = LSAConfig(recency_chunks=1, sink_chunks=0, resident_budget=budget)
        (first, *_) = lookahead_sets(repeated, tau=2, prompt_length=40, compress_rate=4, config=capped)
        assert first[0].tolist() == expected


class FakeAllocator:
    def __init__(self):
        self.now, self.top = 100, 100

    def allocated(self):
        return self.now

    def peak(self):
        return self.top

    def reset_peak(self):
        self.top = self.now

    def use(self, amount):
        self.top = max(self.top, self.now + amount)

    def hold(self, amount):
        self.now += amount
        self.top = max(self.top, self.now)

    def free(self, amount):
        self.now -= amount


def test_phase_peaks_split_at_the_first_one_token_forward():
    model = torch.nn.Module()
    model.forward = lambda input_ids: None
    allocator = FakeAllocator()
    with PhasePeaks(model, allocator) as peaks:
        allocator.use(50)
        model(input_ids=torch.zeros(1, 8))  # prefill
        allocator.use(70)
        model(input_ids=torch.zeros(1, 1))  # first decode step: the prefill peak so far is closed
        allocator.use(20)
        model(input_ids=torch.zeros(1, 1))
    assert (peaks.prefill, peaks.decode) == (70, 20)


def test_an_earlier_generations_garbage_is_not_counted_in_the_start():
    """A cache kept alive only by a reference cycle is freed when the cycle collector runs; here it runs during the
    prefill (as Python may during a generate). Read into the start, its bytes would hide the prefill's own."""
    model = torch.nn.Module()
    model.forward = lambda input_ids: gc.collect()
    allocator = FakeAllocator()
    gc.disable()
    try:
        cache = torch.nn.Module()
        cache.graph = [cache]  # an earlier row's cache and its graph, unreachable, a cycle
        allocator.hold(80)
        weakref.finalize(cache, allocator.free, 80)
        del cache
        with PhasePeaks(model, allocator) as peaks:
            model(input_ids=torch.zeros(1, 8))
            allocator.use(50)
            model(input_ids=torch.zeros(1, 1))
    finally:
        gc.enable()
    assert peaks.prefill == 50


def test_off_cuda_peaks_and_syncs_are_none_not_estimates():
    with PhasePeaks(torch.nn.Linear(1, 1), None) as peaks, host_syncs(torch.device("cpu")) as syncs:
        pass
    assert (peaks.prefill, peaks.decode, syncs[0]) == (None, None, None)


@pytest.mark.gpu
def test_on_cuda_a_host_read_counts_as_a_sync_and_peaks_are_measured():
    device = torch.device("cuda")
    with host_syncs(device) as syncs:
        torch.ones(4, device=device).sum().item()
    assert syncs[0] >= 1
    model = torch.nn.Module()
    model.forward = lambda input_ids: torch.empty(input_ids.shape[1] * 2**20, device=device)
    model.weight = torch.nn.Parameter(torch.zeros(1, device=device))
    with phase_peaks(model) as peaks:
        model(input_ids=torch.zeros(1, 8))
        model(input_ids=torch.zeros(1, 1))
    assert peaks.prefill >= 8 * 2**22 > peaks.decode >= 2**22
