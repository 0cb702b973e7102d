"""The device loader's producer thread: the batches of the calling thread, finished, a bounded number ahead,
errors raised where the training loop sees them, and no thread left once the loop stops."""

import threading
import time
from contextlib import nullcontext
from itertools import count, islice

import pytest
import torch
from training_helpers import TARGET_LAYERS

from fm_transformers.training.device_batches import block_batches, device_batches
from fm_transformers.training.order import EpochOrder
from fm_transformers.training.producer import THREAD_NAME, produced_batches
from fm_transformers.training.shards import LabelShards
from fm_transformers.training.step import TriggerBatch

LAYERS = list(TARGET_LAYERS)
CPU = torch.device("cpu")


def loader_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    """The producer and part-staging threads started since `before` that are still alive."""
    return [t for t in threading.enumerate() if t not in before and t.name.startswith((THREAD_NAME, "fm-stage"))]


def loader_threads_after(before: set[threading.Thread], timeout_s: float = 2.0) -> list[threading.Thread]:
    deadline = time.monotonic() + timeout_s
    while (alive := loader_threads(before)) and time.monotonic() < deadline:
        time.sleep(0.01)
    return alive


def small_batch(value: int) -> TriggerBatch:
    return TriggerBatch(
        positions=torch.full((2,), value),
        hidden={4: torch.full((2, 3), float(value))},
        keys={4: torch.zeros(2, 5, 4)},
        targets=torch.ones(2, 5),
        mask=torch.ones(2, 5),
    )


def both_loaders(shards: LabelShards, start: int):
    """(device_batches, block_batches) of one epoch from `start`, blocks of 3 batches of 4 samples."""
    order = EpochOrder(shards.part_triggers(), batch_size=4, seed=0, epoch=0)
    return (
        device_batches(shards, LAYERS, order, start, 3.0, CPU, prefetch=2, block=3),
        block_batches(shards, LAYERS, EpochOrder(shards.part_triggers(), 4, 0, 0), start, 3.0, CPU, 2, 3),
    )


@pytest.mark.parametrize("start", [0, 7])  # 7: inside the third block, which is rebuilt whole
def test_threaded_batches_are_the_calling_threads_batches_bit_for_bit(split_train_labels, start):
    shards = LabelShards(split_train_labels)
    order = EpochOrder(shards.part_triggers(), batch_size=4, seed=0, epoch=0)
    segments = [order.batch(index) for index in range(len(order))]
    assert len({segment.part for batch in segments for segment in batch}) > 20  # many parts
    assert any(len(batch) > 1 for batch in segments[start:])  # batches that span two parts
    threaded, here = (list(made) for made in both_loaders(shards, start))
    assert len(threaded) == len(here) == len(order) - start > 3 * 3
    for made, reference in zip(threaded, here, strict=True):
        for tensor, expected in zip(made.tensors(), reference.tensors(), strict=True):
            assert tensor.dtype == expected.dtype and torch.equal(tensor, expected)


def test_handed_over_batches_own_their_storage_so_the_steps_fresh_copies_nothing(split_train_labels):
    threaded, here = both_loaders(LabelShards(split_train_labels), 0)
    for made, reference in islice(zip(threaded, here), 6):
        assert any(tensor._base is not None for tensor in reference.tensors())  # out of the block: views
        fresh = made.fresh()
        for tensor, kept in zip(made.tensors(), fresh.tensors(), strict=True):
            assert tensor._base is None and tensor.is_contiguous() and kept is tensor
    threaded.close()


def test_closing_the_batches_early_ends_the_producer_and_part_staging_threads(split_train_labels):
    before = set(threading.enumerate())
    shards = LabelShards(split_train_labels)
    made = device_batches(shards, LAYERS, EpochOrder(shards.part_triggers(), 4, 0, 0), 0, 3.0, CPU)
    next(made), next(made)
    assert {thread.name.split("_")[0] for thread in loader_threads(before)} == {THREAD_NAME, "fm-stage"}
    made.close()
    assert loader_threads(before) == []  # close waits for both threads to end


@pytest.mark.parametrize("leave", ["break", "exception"])
def test_leaving_the_loop_early_ends_the_producer_and_part_staging_threads(split_train_labels, leave):
    before = set(threading.enumerate())
    shards = LabelShards(split_train_labels)
    order = EpochOrder(shards.part_triggers(), batch_size=4, seed=0, epoch=0)
    with pytest.raises(KeyError) if leave == "exception" else nullcontext():
        for index, _ in enumerate(device_batches(shards, LAYERS, order, 0, 3.0, CPU)):
            if index == 2 and leave == "break":
                break
            if index == 2:
                raise KeyError("the training step failed")
    assert loader_threads_after(before) == []  # the dropped iterator was closed


def test_an_error_in_the_producer_is_raised_in_the_loop_after_the_batches_made_before_it():
    before = set(threading.enumerate())

    def make():
        yield small_batch(0)
        yield small_batch(1)
        raise ValueError("part 3 of document 7 is corrupt")

    taken = []
    with pytest.raises(ValueError, match="part 3 of document 7 is corrupt"):
        for batch in produced_batches(make, CPU):
            taken.append(int(batch.positions[0]))
    assert taken == [0, 1]
    assert loader_threads_after(before) == []


def test_a_part_that_fails_to_load_raises_in_the_training_loop(split_train_labels, monkeypatch):
    """The error crosses two threads: part staging, then the producer."""
    before = set(threading.enumerate())
    real, loads = LabelShards.load_part, count()

    def failing(self, doc, part, names=None, **options):
        if next(loads) == 4:
            raise OSError(f"shard of document {doc} unreadable")
        return real(self, doc, part, names, **options)

    monkeypatch.setattr(LabelShards, "load_part", failing)
    shards = LabelShards(split_train_labels)
    order = EpochOrder(shards.part_triggers(), batch_size=4, seed=0, epoch=0)
    with pytest.raises(OSError, match="unreadable"):
        for _ in device_batches(shards, LAYERS, order, 0, 3.0, CPU):
            pass
    assert loader_threads_after(before) == []


def test_the_producer_runs_at_most_depth_batches_ahead_of_the_loop():
    made = []

    def make():
        for index in count():
            made.append(index)
            yield small_batch(index)

    batches = produced_batches(make, CPU, depth=2)
    next(batches)
    deadline = time.monotonic() + 2.0
    while len(made) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert len(made) == 1 + 2 + 1  # the one taken, two in the queue, one waiting for room
    batches.close()


@pytest.mark.gpu
def test_batches_handed_over_on_the_gpu_are_those_made_on_the_training_stream(split_train_labels):
    shards = LabelShards(split_train_labels)
    order = EpochOrder(shards.part_triggers(), batch_size=32, seed=0, epoch=0)
    gpu = torch.device("cuda")
    threaded = device_batches(shards, LAYERS, order, 0, 3.0, gpu)
    here = block_batches(shards, LAYERS, EpochOrder(shards.part_triggers(), 32, 0, 0), 0, 3.0, gpu)
    for made, reference in zip(threaded, here, strict=True):
        for tensor, expected in zip(made.tensors(), reference.tensors(), strict=True):
            assert tensor.is_cuda and torch.equal(tensor * 1, expected)  # read on the training stream
