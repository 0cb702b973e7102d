"""Training samples from label shards: one sample per trigger step, positives plus sampled negatives.

A sample is what the memory indexer sees at a trigger step t: the hidden state entering each target layer,
the position t, and a candidate set of chunks visible at t with their frozen keys and 0/1 targets. Positives
are the lookahead union; negatives are drawn uniformly from the other visible chunks, `negative_ratio` per
positive. The draw depends only on (seed, epoch, sample), so a run is reproducible and a resumed run sees the
same negatives it would have seen without the interruption.
"""

from collections import OrderedDict

import torch
from torch.utils.data import Dataset, Sampler

from .labels import visible_chunks
from .shards import LabelShards


class TriggerDataset(Dataset):
    """Index i is (document, trigger); documents are read lazily and the last few are kept in memory."""

    def __init__(
        self,
        shards: LabelShards,
        layers: list[int],
        negative_ratio: float = 3.0,
        seed: int = 0,
        cached_documents: int = 4,
    ):
        missing = [layer for layer in layers if layer not in shards.target_layers]
        if missing:
            raise ValueError(
                f"layers {missing} were not dumped in {shards.directory} (it has {shards.target_layers}): "
                f"train on dumped layers or dump labels for these"
            )
        if negative_ratio < 0:
            raise ValueError(f"negative_ratio must be >= 0, got {negative_ratio}")
        self.shards = shards
        self.layers = list(layers)
        self.negative_ratio = negative_ratio
        self.seed = seed
        self.epoch = 0
        self.index = [(doc, trig) for doc, ref in enumerate(shards.documents) for trig in range(ref.triggers)]
        self._cache: OrderedDict[int, dict] = OrderedDict()
        self._cached_documents = cached_documents

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.index)

    def document(self, doc: int) -> dict[str, torch.Tensor]:
        if doc in self._cache:
            self._cache.move_to_end(doc)
        else:
            self._cache[doc] = self.shards.load(doc)
            if len(self._cache) > self._cached_documents:
                self._cache.popitem(last=False)
        return self._cache[doc]

    def __getitem__(self, i: int) -> dict:
        doc, trig = self.index[i]
        data = self.document(doc)
        position = data["positions"][trig]
        visible = int(visible_chunks(position, self.shards.compress_rate))
        indptr = data["labels/indptr"]
        positives = data["labels/indices"][indptr[trig] : indptr[trig + 1]]
        generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, i)) & 0x7FFFFFFF)
        negatives = _sample_negatives(positives, visible, self.negative_ratio, generator)
        candidates = torch.cat([positives, negatives])
        targets = torch.cat([torch.ones(positives.numel()), torch.zeros(negatives.numel())])
        return {
            "position": position,
            "candidates": candidates,
            "targets": targets,
            "hidden": {layer: data[f"hidden/{layer}"][trig] for layer in self.layers},
            "keys": {layer: data[f"keys/{layer}"][candidates] for layer in self.layers},
        }


def _sample_negatives(positives: torch.Tensor, visible: int, ratio: float, generator) -> torch.Tensor:
    """Up to ratio x max(1, positives) distinct visible chunks that are not positives."""
    free = torch.ones(visible, dtype=torch.bool)
    free[positives] = False
    pool = free.nonzero().flatten()
    count = min(pool.numel(), round(ratio * max(1, positives.numel())))
    return pool[torch.randperm(pool.numel(), generator=generator)[:count]]


def collate_triggers(samples: list[dict]) -> dict:
    """Pad the candidate sets to the longest in the batch; `mask` is 1 on real candidates.

    Returns positions (B,), hidden {layer: (B, hidden)}, keys {layer: (B, N, head_dim)}, targets and mask (B, N).
    """
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
    return {
        "positions": torch.stack([sample["position"] for sample in samples]),
        "hidden": {layer: torch.stack([sample["hidden"][layer] for sample in samples]) for layer in layers},
        "keys": keys,
        "targets": targets,
        "mask": mask,
    }


class DocumentBlockSampler(Sampler[int]):
    """Shuffles documents, then the triggers inside each one, and visits one document at a time.

    Reading a document's keys costs far more than one sample, so consecutive samples share a document; the
    order is a function of (seed, epoch) only.
    """

    def __init__(self, dataset: TriggerDataset, seed: int = 0):
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        starts, offset = [], 0
        for document in self.dataset.shards.documents:
            starts.append((offset, document.triggers))
            offset += document.triggers
        for doc in torch.randperm(len(starts), generator=generator).tolist():
            start, count = starts[doc]
            yield from (start + i for i in torch.randperm(count, generator=generator).tolist())
