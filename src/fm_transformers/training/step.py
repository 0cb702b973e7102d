"""What one training step computes: every target layer's logits over its candidate chunks, and their loss.

Both loaders (device_batches.py, and the host reference in dataset.py) hand the step a `TriggerBatch` whose
candidate keys are already gathered, so the step is the same whichever made the batch. The query tower runs
under the trainer's mixed precision (bf16 matmuls, fp32 accumulation in the GEMMs, fp32 master weights); the
candidate dot products run in `dtype` and the head-weighted sum and the loss in fp32, as in
MemoryIndexer.forward, so the logits are the indexer's own.
"""

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .losses import indexer_loss


@dataclass
class TriggerBatch:
    """A batch of trigger steps with padded candidate sets; `mask` is 1 on real candidates."""

    positions: torch.Tensor  # (batch,) token position of each trigger step
    hidden: dict[int, torch.Tensor]  # {layer: (batch, hidden)}
    keys: dict[int, torch.Tensor]  # {layer: (batch, candidates, head_dim)} frozen keys of the candidates
    targets: torch.Tensor  # (batch, candidates) 1 on positives, 0 on negatives and padding
    mask: torch.Tensor  # (batch, candidates)

    def to(self, device) -> "TriggerBatch":
        return self._map(lambda tensor: tensor.to(device))

    def fresh(self) -> "TriggerBatch":
        """The batch with every view and non-contiguous tensor replaced by a contiguous copy of its own; tensors
        that already own their storage are kept, not copied.

        The device loader slices positions, hidden states, targets and mask out of its block as views (its keys
        are gathered into new tensors, about 200 MB a batch at release sizes) and calls this on its own thread
        before handing a batch over (producer.py), so for its batches the step's call copies nothing.
        torch.compile guards on whether an input is a view, so a step fed views after non-views, or the reverse,
        would compile again."""
        return self._map(_owning)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of the batch."""
        values = [getattr(self, field.name) for field in fields(self)]
        return [item for value in values for item in (value.values() if isinstance(value, dict) else [value])]

    def _map(self, function) -> "TriggerBatch":
        def apply(value):
            return {key: function(item) for key, item in value.items()} if isinstance(value, dict) else function(value)

        return TriggerBatch(**{field.name: apply(getattr(self, field.name)) for field in fields(self)})


def _owning(tensor: torch.Tensor) -> torch.Tensor:
    if tensor._base is None and tensor.is_contiguous():
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def candidate_logits(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One layer's logits (batch, candidates), fp32: q (batch, heads, head_dim), weights (batch, heads) fp32, keys
    (batch, candidates, head_dim); the dot products in `dtype` (bf16: tensor cores, fp32 accumulation)."""
    dots = torch.einsum("bhd,bnd->bhn", q.to(dtype), keys.to(dtype))  # (batch, heads, candidates)
    return (F.relu(dots).float() * weights.unsqueeze(-1)).sum(dim=1)


class IndexerLoss(nn.Module):
    """The mean over target layers of each layer's loss on the whole positive set: at inference any one of them
    may select a chunk. One forward per backward, as DDP (several GPUs) requires. Every layer has the same
    candidates, so the mean of the layers' losses is one loss over their stacked logits.

    compile: run the forward (query towers, scoring and loss of every layer) and its backward through
    torch.compile, which fuses the elementwise work (RMSNorm, rotary, relu, head weighting, focal loss) into a few
    kernels instead of a few hundred launches a step; candidate counts vary from batch to batch, so dynamic shapes.
    """

    def __init__(self, indexer, layers: list[int], kind: str, gamma: float, dtype: torch.dtype, compile: bool = False):
        super().__init__()
        self.indexer = indexer
        self.layers = layers
        self.kind, self.gamma, self.dtype = kind, gamma, dtype
        self.compiled = compile
        self._loss = torch.compile(self._batch_loss, dynamic=True) if compile else self._batch_loss

    def forward(self, batch: TriggerBatch) -> torch.Tensor:
        if self.compiled:  # no views: a view where the graph last saw a non-view makes it recompile
            batch = batch.fresh()
        return self._loss(batch.positions, batch.hidden, batch.keys, batch.targets, batch.mask)

    def _batch_loss(self, positions, hidden: dict, keys: dict, targets, mask) -> torch.Tensor:
        parameter_dtype = next(self.indexer.parameters()).dtype
        positions = positions.unsqueeze(0)  # the batch is one "sequence" of queries: (1, batch)
        states = {layer: hidden[layer].unsqueeze(0).to(parameter_dtype) for layer in self.layers}  # (1, batch, hidden)
        cos, sin = self.indexer.rotary(states[self.layers[0]], positions)  # the same positions for every layer
        logits = []
        for layer in self.layers:
            q, weights = self.indexer.indexers[str(layer)].query(states[layer], cos, sin)  # (1, batch, heads, ...)
            logits.append(candidate_logits(q[0], weights[0], keys[layer], self.dtype))
        count = len(self.layers)
        stacked = torch.stack(logits)  # (layers, batch, candidates)
        return indexer_loss(stacked, targets.expand(count, -1, -1), mask.expand(count, -1, -1), self.kind, self.gamma)
