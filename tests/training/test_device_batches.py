"""Batches made on the device against the host reference, the negative draw, and bounded staging."""

import weakref

import pytest
import torch
from training_helpers import TARGET_LAYERS

from fm_transformers.training.dataset import HostBatches, host_batches
from fm_transformers.training.device_batches import candidate_sets, device_batches, sample_counts
from fm_transformers.training.order import EpochOrder
from fm_transformers.training.read_groups import ReadGroups
from fm_transformers.training.shards import LabelShards

LAYERS = list(TARGET_LAYERS)
CPU = torch.device("cpu")


def csr(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(indptr, indices) of `rows`, indices with the spare entry staging adds."""
    indptr = torch.tensor([0] + [len(row) for row in rows]).cumsum(0)
    return indptr, torch.tensor([chunk for row in rows for chunk in row] + [0])


def draw(rows: list[list[int]], visible: list[int], ratio: float = 3.0, seed: int = 0):
    indptr, indices = csr(rows)
    visible, picked = torch.tensor(visible), torch.arange(len(rows))
    counts = sample_counts(indptr, visible, picked, ratio)
    width = int((counts.positives + counts.negatives).max())
    generator = torch.Generator().manual_seed(seed)
    return candidate_sets(
        indptr, indices, visible, picked, ratio, width, int(visible.max()), int(counts.negatives.max()), generator
    )


def test_candidates_are_the_positives_in_order_then_distinct_visible_negatives():
    positives, visible = [[7, 2], [], [0, 1, 2, 3, 4]], [40, 9, 6]
    candidates, targets, mask = draw(positives, visible)
    assert candidates.shape == (3, 8)  # the longest set: 2 + 6
    for row, (own, limit) in enumerate(zip(positives, visible, strict=True)):
        count = int(mask[row].sum())
        assert candidates[row, : len(own)].tolist() == own and targets[row].sum() == len(own)
        negatives = candidates[row, len(own) : count].tolist()
        assert len(negatives) == min(3 * max(1, len(own)), limit - len(own))
        assert len(set(negatives)) == len(negatives) and not set(negatives) & set(own)
        assert all(0 <= chunk < limit for chunk in negatives)
        assert mask[row, count:].sum() == 0 and targets[row, len(own) :].sum() == 0


def test_negatives_are_a_uniform_draw_over_the_free_chunks():
    counts = torch.zeros(12)
    for seed in range(400):
        candidates, _, mask = draw([[3, 5]], [12], ratio=1.0, seed=seed)
        counts[candidates[0, 2:4]] += 1
    free = [chunk for chunk in range(12) if chunk not in (3, 5)]
    assert counts[[3, 5]].sum() == 0
    expected = 400 * 2 / len(free)  # 80 per free chunk
    assert ((counts[free] - expected).abs() < 25).all(), counts


def test_the_same_seed_draws_the_same_negatives():
    first, second, other = (draw([[1], [4, 8]], [30, 30], seed=seed)[0] for seed in (5, 5, 6))
    assert torch.equal(first, second) and not torch.equal(first, other)


def loader_source(shards: LabelShards, grouped: bool):
    """What a loader reads: the parts themselves, or in groups of several parts (read_groups.py)."""
    return ReadGroups(shards, min_triggers=3 * max(shards.part_triggers())) if grouped else shards


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("labels", ["train_labels", "split_train_labels"])
def test_device_batches_hold_the_host_references_samples_with_another_negative_draw(labels, grouped, request):
    source = loader_source(LabelShards(request.getfixturevalue(labels)), grouped)
    order = EpochOrder(source.part_triggers(), batch_size=32, seed=0, epoch=1)
    made = list(device_batches(source, LAYERS, order, 0, 3.0, CPU))
    reference = list(host_batches(source, LAYERS, order, 0, 3.0))
    assert len(made) == len(reference) == len(order)
    for device, host in zip(made, reference, strict=True):
        assert torch.equal(device.positions, host.positions)
        assert torch.equal(device.targets, host.targets) and torch.equal(device.mask, host.mask)
        positive, negative = host.targets.bool(), (host.mask - host.targets).bool()
        for layer in LAYERS:
            assert torch.equal(device.hidden[layer], host.hidden[layer])
            assert torch.equal(device.keys[layer][positive], host.keys[layer][positive])
        assert not torch.equal(device.keys[4][negative], host.keys[4][negative])


def test_a_resumed_epoch_makes_the_batches_of_an_uninterrupted_one(split_train_labels):
    shards = LabelShards(split_train_labels)
    order = EpochOrder(shards.part_triggers(), batch_size=8, seed=0, epoch=0)
    whole = list(device_batches(shards, LAYERS, order, 0, 3.0, CPU))
    resumed = list(device_batches(shards, LAYERS, EpochOrder(shards.part_triggers(), 8, 0, 0), 5, 3.0, CPU))
    assert len(resumed) == len(whole) - 5
    for first, second in zip(whole[5:], resumed, strict=True):
        assert torch.equal(first.keys[6], second.keys[6]) and torch.equal(first.mask, second.mask)


def test_the_device_loader_holds_a_bounded_number_of_parts(split_train_labels, monkeypatch):
    shards = LabelShards(split_train_labels)
    live, peak, loaded = set(), [0], [0]
    real = LabelShards.load_part

    def counted(self, doc, part, names=None, **options):
        data = real(self, doc, part, names, **options)
        key = (doc, part, loaded[0])
        loaded[0] += 1
        live.add(key)
        weakref.finalize(data["positions"], live.discard, key)
        peak[0] = max(peak[0], len(live))
        return data

    monkeypatch.setattr(LabelShards, "load_part", counted)
    order = EpochOrder(shards.part_triggers(), batch_size=2, seed=0, epoch=0)
    blocks = [range(first, min(first + 3, len(order))) for first in range(0, len(order), 3)]
    spans = [{segment.order_position for index in block for segment in order.batch(index)} for block in blocks]
    for _ in device_batches(shards, LAYERS, order, 0, 3.0, CPU, prefetch=2, block=3):
        pass
    assert loaded[0] == len(shards.parts) > 40
    assert peak[0] <= max(len(span) for span in spans) + 2 < 8


def test_host_reference_samples_hold_three_negatives_per_positive(train_labels):
    shards = LabelShards(train_labels)
    dataset = HostBatches(shards, LAYERS, EpochOrder(shards.part_triggers(), 32, 0, 0), negative_ratio=3.0)
    for part, row in [(0, 0), (3, 7), (15, 18)]:
        sample = dataset.sample(part, row)
        positives = sample["candidates"][sample["targets"] == 1]
        negatives = sample["candidates"][sample["targets"] == 0]
        visible = (int(sample["position"]) + 1) // 4
        assert negatives.numel() == min(3 * max(1, positives.numel()), visible - positives.numel())
        assert not set(negatives.tolist()) & set(positives.tolist())
        assert int(sample["candidates"].max()) < visible


@pytest.mark.gpu
@pytest.mark.parametrize("grouped", [False, True])  # groups: joined CSR pointers and key bases travel on their own
def test_parts_staged_on_the_gpu_make_the_cpu_batches(split_train_labels, grouped):
    source = loader_source(LabelShards(split_train_labels), grouped)
    order = EpochOrder(source.part_triggers(), batch_size=32, seed=0, epoch=0)
    on_gpu = device_batches(source, LAYERS, order, 0, 3.0, torch.device("cuda"), prefetch=3)
    for gpu, cpu in zip(on_gpu, device_batches(source, LAYERS, order, 0, 3.0, CPU), strict=True):
        assert gpu.keys[4].is_cuda
        assert torch.equal(gpu.positions.cpu(), cpu.positions) and torch.equal(gpu.mask.cpu(), cpu.mask)
        positive = cpu.targets.bool()
        for layer in LAYERS:
            assert torch.equal(gpu.keys[layer].cpu()[positive], cpu.keys[layer][positive])
