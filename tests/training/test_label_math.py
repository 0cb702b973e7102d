"""The label steps of REFERENCE.md section 3 on hand-built score tensors."""

import logging
import math

import pytest
import torch

from fm_transformers.training.labels import (
    LabelConfig,
    LookaheadUnion,
    effective_vote,
    layer_votes,
    nucleus_top_k,
    picked_pairs,
    trigger_positions,
    vote_golden,
)

RATE = 4


def kept(scores, position, top_k, mass=0.6):
    """The set of chunks one token keeps, from a 1-D list of logits."""
    indices, keep = nucleus_top_k(torch.tensor([scores]), torch.tensor([position]), top_k, RATE, mass)
    return set(indices[0][keep[0]].tolist())


def logits_of(probabilities):
    return [math.log(p) for p in probabilities]


def test_nucleus_keeps_the_chunk_that_crosses_the_mass():
    # cumulative 0.5 < 0.6, then 0.8: the second chunk crosses 0.6 and stays, the rest go
    assert kept(logits_of([0.5, 0.3, 0.15, 0.05]), position=15, top_k=4) == {0, 1}


def test_nucleus_keeps_the_first_chunk_even_when_it_alone_exceeds_the_mass():
    assert kept(logits_of([0.9, 0.05, 0.05]), position=15, top_k=3) == {0}
    assert kept(logits_of([0.4, 0.3, 0.3]), position=15, top_k=3, mass=1e-6) == {0}


def test_nucleus_with_full_mass_keeps_the_whole_top_k():
    assert kept(logits_of([0.4, 0.3, 0.2, 0.1]), position=15, top_k=4, mass=1.0) == {0, 1, 2, 3}


def test_nucleus_order_follows_scores_not_chunk_index():
    assert kept(logits_of([0.05, 0.15, 0.3, 0.5]), position=15, top_k=4) == {2, 3}


def test_softmax_is_over_the_top_k_only():
    # top-2 are chunks 0 and 2 with softmax [0.525, 0.475]: both are needed to reach 0.6
    scores = [5.0, 0.0, 4.9, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert kept(scores, position=31, top_k=2) == {0, 2}


def test_future_chunks_are_never_kept_whatever_their_score():
    # position 7 sees chunks 0 and 1 only: (7 + 1) // 4 = 2
    indices, keep = nucleus_top_k(torch.tensor([[1.0, 0.5, 9.0, 9.0, 9.0]]), torch.tensor([7]), 3, RATE, 0.99)
    assert set(indices[0][keep[0]].tolist()) == {0, 1}


def test_a_token_that_sees_no_chunk_keeps_nothing():
    _, keep = nucleus_top_k(torch.tensor([[1.0, 2.0]]), torch.tensor([2]), 2, RATE, 0.6)
    assert not keep.any()


def test_tied_scores_enter_the_top_k_earliest_chunk_first():
    indices, _ = nucleus_top_k(torch.zeros(1, 6), torch.tensor([23]), 4, RATE, 0.6)
    assert indices[0].tolist() == [0, 1, 2, 3]


def test_chunks_tied_with_the_crossing_chunk_are_all_kept():
    # four equal probabilities of 0.25: the third crosses 0.6 and the fourth ties with it
    assert kept([1.0, 1.0, 1.0, 1.0], position=15, top_k=4) == {0, 1, 2, 3}
    # a strictly smaller fourth is dropped
    assert kept([1.0, 1.0, 1.0, 0.0], position=15, top_k=4) == {0, 1, 2}


def test_the_top_k_is_capped_by_the_visible_chunks():
    indices, keep = nucleus_top_k(torch.tensor([[3.0, 2.0, 1.0, 0.0]]), torch.tensor([11]), 6, RATE, 1.0)
    assert set(indices[0][keep[0]].tolist()) == {0, 1, 2}


def _layer(sets, width=3):
    """(indices, keep) for tokens whose kept chunks are `sets` (one set per token row)."""
    indices = torch.full((len(sets), width), 0)
    keep = torch.zeros(len(sets), width, dtype=torch.bool)
    for row, chunks in enumerate(sets):
        for slot, chunk in enumerate(sorted(chunks)):
            indices[row, slot], keep[row, slot] = chunk, True
    return indices, keep


def test_vote_keeps_chunks_in_at_least_vote_layers():
    layers = [_layer([{5, 7}]), _layer([{5, 7}]), _layer([{7, 9}])]
    rows, chunks = vote_golden(layers, vote=3)
    assert chunks.tolist() == [7] and rows.tolist() == [0]
    rows, chunks = vote_golden(layers, vote=2)
    assert sorted(chunks.tolist()) == [5, 7]


def test_vote_counts_each_token_separately():
    layers = [_layer([{1}, {2}]), _layer([{2}, {1}])]
    rows, _ = vote_golden(layers, vote=2)
    assert rows.numel() == 0


def test_vote_larger_than_the_csa_layers_is_clamped_and_said(caplog):
    with caplog.at_level(logging.WARNING):
        assert effective_vote(3, 2) == 2
    assert "exceeds the backbone's 2 CSA layers" in caplog.text
    assert effective_vote(3, 21) == 3


def test_picked_pairs_skip_empty_slots_and_keep_repeats():
    rows, chunks = picked_pairs([torch.tensor([[0, 1, -1]]), torch.tensor([[1, -1, -1]])])
    assert sorted(zip(rows.tolist(), chunks.tolist(), strict=True)) == [(0, 0), (0, 1), (0, 1)]


def test_trigger_steps_start_after_warmup_and_keep_whole_windows():
    assert trigger_positions(100, warmup=16, tau=16).tolist() == [16, 32, 48, 64, 80]
    assert trigger_positions(40, warmup=16, tau=32).tolist() == []


def test_lookahead_union_is_per_window_and_causal():
    union = LookaheadUnion(torch.tensor([16, 32]), tau=16, compress_rate=RATE)
    positions = torch.tensor([10, 16, 20, 31, 32, 47, 48])
    chunks = torch.tensor([0, 1, 3, 4, 7, 2, 5])
    union.add(positions, chunks)
    indptr, indices, _ = union.to_csr()
    # window 16..31 sees chunks < 17 // 4 = 4, so chunk 4 (named at 31) is out; 10 is before and 48 after
    assert indptr.tolist() == [0, 2, 4]
    assert indices.tolist() == [1, 3, 2, 7]


def test_lookahead_union_merges_calls_and_counts_repeats():
    union = LookaheadUnion(torch.tensor([16]), tau=16, compress_rate=RATE)
    union.add(torch.tensor([16, 17]), torch.tensor([2, 2]))
    union.add(torch.tensor([30]), torch.tensor([2]))
    union.add(torch.tensor([31]), torch.tensor([0]))
    indptr, indices, counts = union.to_csr()
    assert indices.tolist() == [0, 2] and counts.tolist() == [1, 3] and indptr.tolist() == [0, 2]


def test_layer_votes_count_the_layers_per_token_and_chunk():
    layers = [_layer([{5, 7}, {1}]), _layer([{5, 7}, {2}]), _layer([{7, 9}, {1}])]
    rows, chunks, votes = layer_votes(layers)
    assert sorted(zip(rows.tolist(), chunks.tolist(), votes.tolist(), strict=True)) == [
        (0, 5, 2), (0, 7, 3), (0, 9, 1), (1, 1, 2), (1, 2, 1)
    ]


def test_lookahead_union_by_max_keeps_the_most_layers_at_one_token_of_the_window():
    union = LookaheadUnion(torch.tensor([16]), tau=16, compress_rate=RATE, reduce="max")
    union.add(torch.tensor([16, 17, 20]), torch.tensor([2, 2, 3]), torch.tensor([1, 3, 2]))
    union.add(torch.tensor([30, 40]), torch.tensor([2, 1]), torch.tensor([2, 7]))  # 40: outside the window
    indptr, indices, layers = union.to_csr()
    assert indices.tolist() == [2, 3] and layers.tolist() == [3, 2] and indptr.tolist() == [0, 2]


def test_lookahead_union_refuses_an_unknown_reduction():
    with pytest.raises(ValueError, match="reduce must be"):
        LookaheadUnion(torch.tensor([16]), tau=16, compress_rate=RATE, reduce="mean")


def test_lookahead_union_of_nothing_is_empty_rows():
    indptr, indices, counts = LookaheadUnion(torch.tensor([16, 32]), 16, RATE).to_csr()
    assert indptr.tolist() == [0, 0, 0] and indices.numel() == 0 and counts.numel() == 0


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"tau": 0}, "tau must be at least 1"),
        ({"nucleus": 0.0}, "nucleus must be a probability mass"),
        ({"nucleus": 1.5}, "nucleus must be a probability mass"),
        ({"vote": 0}, "vote must be at least 1"),
        ({"warmup": -1}, "warmup must be a token count"),
    ],
)
def test_label_config_refuses_impossible_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        LabelConfig(**settings)
