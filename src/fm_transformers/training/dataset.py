"""The host reference loader: batches built sample by sample on the CPU, then copied to the device each step.

A sample is what the memory indexer sees at a trigger step t: the hidden state entering each target layer, the
position t, and a candidate set of chunks visible at t with their frozen keys and 0/1 targets. Positives are
the lookahead union; negatives are drawn uniformly from the other visible chunks, `negative_ratio` per
positive, with a CPU generator seeded by (seed, epoch, part, row); `collate_triggers` copies each sample's keys
into a padded batch. This is how the trainer first made its batches; device_batches.py makes the same batches
(same samples, order and layout, negatives from another random draw) on the device. It stays as the reference
that one is tested against and as the baseline the throughput benchmark measures (TrainConfig.loader="host").
"""

from collections import OrderedDict
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from .labels import visible_chunks
from .order import EpochOrder, seed_from
from .shards import LabelShards
from .staging import tensor_names
from .step import TriggerBatch


class HostBatches(Dataset):
    """Item i is this process's batch i of the epoch in `order`; parts are read lazily, the last few kept."""

    def __init__(
        self, shards: LabelShards, layers: list[int], order: EpochOrder, negative_ratio: float, cached_parts: int = 4
    ):
        self.shards, self.layers, self.order, self.negative_ratio = shards, list(layers), order, negative_ratio
        self._cache: OrderedDict[int, dict] = OrderedDict()
        self._cached_parts = cached_parts

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, index: int) -> TriggerBatch:
        segments = self.order.batch(index)
        samples = [self.sample(segment.part, row) for segment in segments for row in segment.rows.tolist()]
        return collate_triggers(samples)

    def part(self, part: int) -> dict[str, torch.Tensor]:
        if part in self._cache:
            self._cache.move_to_end(part)
        else:
            self._cache[part] = self.shards.read_part(part, tensor_names(self.layers))
            if len(self._cache) > self._cached_parts:
                self._cache.popitem(last=False)
        return self._cache[part]

    def sample(self, part: int, row: int) -> dict:
        data = self.part(part)
        position = data["positions"][row]
        visible = int(visible_chunks(position, self.shards.compress_rate))
        indptr = data["labels/indptr"]
        positives = data["labels/indices"][indptr[row] : indptr[row + 1]]
        generator = torch.Generator().manual_seed(seed_from(self.order.seed, self.order.epoch, part, row))
        negatives = _sample_negatives(positives, visible, self.negative_ratio, generator)
        candidates = torch.cat([positives, negatives])
        keys_at = candidates + (data["key_base"][row] if "key_base" in data else 0)  # a group's keys: end to end
        return {
            "position": position,
            "candidates": candidates,
            "targets": torch.cat([torch.ones(positives.numel()), torch.zeros(negatives.numel())]),
            "hidden": {layer: data[f"hidden/{layer}"][row] for layer in self.layers},
            "keys": {layer: data[f"keys/{layer}"][keys_at] for layer in self.layers},
        }


def host_batches(
    shards: LabelShards, layers: list[int], order: EpochOrder, start: int, negative_ratio: float, num_workers: int = 0
) -> Iterator[TriggerBatch]:
    """This process's batches `start`.. of the epoch in `order`, on the CPU (num_workers > 0: in worker processes)."""
    dataset = HostBatches(shards, layers, order, negative_ratio)
    yield from DataLoader(dataset, batch_size=None, sampler=range(start, len(dataset)), num_workers=num_workers)


def _sample_negatives(positives: torch.Tensor, visible: int, ratio: float, generator) -> torch.Tensor:
    """Up to ratio x max(1, positives) distinct visible chunks that are not positives."""
    free = torch.ones(visible, dtype=torch.bool)
    free[positives] = False
    pool = free.nonzero().flatten()
    count = min(pool.numel(), round(ratio * max(1, positives.numel())))
    return pool[torch.randperm(pool.numel(), generator=generator)[:count]]


def collate_triggers(samples: list[dict]) -> TriggerBatch:
    """Pad the candidate sets to the longest in the batch; `mask` is 1 on real candidates."""
    width = max(1, max(sample["candidates"].numel() for sample in samples))
    batch = len(samples)
    targets = torch.zeros(batch, width)
    mask = torch.zeros(batch, width)
    layers = list(samples[0]["hidden"])
    keys = {}
    for layer in layers:
        head_dim = samples[0]["keys"][layer].shape[-1]
        keys[layer] = torch.zeros(batch, width, head_dim, dtype=samples[0]["keys"][layer].dtype)
    for row, sample in enumerate(samples):
        count = sample["candidates"].numel()
        targets[row, :count] = sample["targets"]
        mask[row, :count] = 1.0
        for layer in layers:
            keys[layer][row, :count] = sample["keys"][layer]
    return TriggerBatch(
        positions=torch.stack([sample["position"] for sample in samples]),
        hidden={layer: torch.stack([sample["hidden"][layer] for sample in samples]) for layer in layers},
        keys=keys,
        targets=targets,
        mask=mask,
    )
