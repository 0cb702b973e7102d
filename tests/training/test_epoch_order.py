"""The visiting order of an epoch: every trigger step once, one part at a time, reachable at any batch."""

import torch

from fm_transformers.training.order import EpochOrder

PART_TRIGGERS = [5, 3, 7, 1, 9, 4]


def visited(order: EpochOrder) -> list[tuple[int, int]]:
    segments = [segment for index in range(len(order)) for segment in order.batch(index)]
    return [(segment.part, row) for segment in segments for row in segment.rows.tolist()]


def test_an_epoch_visits_every_trigger_step_once_in_batches_of_the_batch_size():
    order = EpochOrder(PART_TRIGGERS, batch_size=4, seed=0, epoch=0)
    samples = visited(order)
    assert sorted(samples) == [(part, row) for part, count in enumerate(PART_TRIGGERS) for row in range(count)]
    sizes = [sum(segment.rows.numel() for segment in order.batch(index)) for index in range(len(order))]
    assert sizes == [4] * 7 + [1]


def test_an_epoch_visits_one_part_at_a_time():
    parts = [part for part, _ in visited(EpochOrder(PART_TRIGGERS, batch_size=4, seed=3, epoch=1))]
    runs = [part for index, part in enumerate(parts) if index == 0 or parts[index - 1] != part]
    assert sorted(runs) == list(range(len(PART_TRIGGERS)))


def test_the_order_is_a_function_of_seed_and_epoch():
    same = visited(EpochOrder(PART_TRIGGERS, 4, seed=0, epoch=0))
    assert visited(EpochOrder(PART_TRIGGERS, 4, seed=0, epoch=0)) == same
    assert visited(EpochOrder(PART_TRIGGERS, 4, seed=1, epoch=0)) != same
    assert visited(EpochOrder(PART_TRIGGERS, 4, seed=0, epoch=1)) != same


def test_a_batch_reached_directly_is_the_batch_reached_in_order():
    walked = EpochOrder(PART_TRIGGERS, 4, seed=0, epoch=2)
    in_order = [walked.batch(index) for index in range(len(walked))]
    direct = EpochOrder(PART_TRIGGERS, 4, seed=0, epoch=2).batch(5)
    assert [(s.part, s.start, s.end) for s in direct] == [(s.part, s.start, s.end) for s in in_order[5]]
    assert all(torch.equal(a.rows, b.rows) for a, b in zip(direct, in_order[5], strict=True))


def test_processes_take_disjoint_batches_and_the_same_number_of_them():
    whole = EpochOrder(PART_TRIGGERS, 4, seed=0, epoch=0)
    shares = [EpochOrder(PART_TRIGGERS, 4, seed=0, epoch=0, rank=rank, world=3) for rank in range(3)]
    assert [len(share) for share in shares] == [len(whole) // 3] * 3
    taken = [sample for share in shares for sample in visited(share)]
    assert len(taken) == len(set(taken)) == 3 * (len(whole) // 3) * 4
    assert set(taken) <= set(visited(whole))


def test_the_order_is_the_one_earlier_checkpoints_were_trained_in():
    # a checkpoint resumes at a batch index: the order of a given seed must not change between versions
    order = EpochOrder(PART_TRIGGERS, 4, seed=0, epoch=0)
    batches = [[(segment.part, segment.rows.tolist()) for segment in order.batch(index)] for index in (0, 3, 7)]
    assert batches == [[(2, [1, 6, 0, 5])], [(4, [8, 5, 2, 4])], [(1, [1])]]
