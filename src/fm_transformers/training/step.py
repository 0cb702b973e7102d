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

    def to(self, device, non_blocking: bool = False) -> "TriggerBatch":
        def move(value):
            if isinstance(value, dict):
                return {key: move(item) for key, item in value.items()}
            return value.to(device, non_blocking=non_blocking)

        return TriggerBatch(**{field.name: move(getattr(self, field.name)) for field in fields(self)})


def candidate_loss(
    q: torch.Tensor,
    weights: torch.Tensor,
    keys: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    dtype: torch.dtype,
    kind: str,
    gamma: float,
) -> torch.Tensor:
    """One layer's loss. q (batch, heads, head_dim), weights (batch, heads) fp32, keys (batch, candidates, head_dim)."""
    dots = torch.einsum("bhd,bnd->bhn", q.to(dtype), keys.to(dtype))  # (batch, heads, candidates)
    logits = (F.relu(dots).float() * weights.unsqueeze(-1)).sum(dim=1)  # (batch, candidates)
    return indexer_loss(logits, targets, mask, kind, gamma)


class IndexerLoss(nn.Module):
    """The mean over target layers of each layer's loss on the whole positive set: at inference any one of them
    may select a chunk. One forward per backward, as DDP (several GPUs) requires.

    compile: run the forward (query towers, scoring and loss of every layer) and its backward through
    torch.compile, which fuses the elementwise work (RMSNorm, rotary, relu, head weighting, focal loss) into a few
    kernels instead of a few hundred launches a step; candidate counts vary from batch to batch, so dynamic shapes.
    """

    def __init__(self, indexer, layers: list[int], kind: str, gamma: float, dtype: torch.dtype, compile: bool = False):
        super().__init__()
        self.indexer = indexer
        self.layers = layers
        self.kind, self.gamma, self.dtype = kind, gamma, dtype
        self._loss = torch.compile(self._batch_loss, dynamic=True) if compile else self._batch_loss

    def forward(self, batch: TriggerBatch) -> torch.Tensor:
        return self._loss(batch.positions, batch.hidden, batch.keys, batch.targets, batch.mask)

    def _batch_loss(self, positions, hidden: dict, keys: dict, targets, mask) -> torch.Tensor:
        parameter_dtype = next(self.indexer.parameters()).dtype
        positions = positions.unsqueeze(0)  # the batch is one "sequence" of queries: (1, batch)
        losses = []
        for layer in self.layers:
            states = hidden[layer].unsqueeze(0).to(parameter_dtype)  # (1, batch, hidden)
            q, weights = self.indexer.query(layer, states, positions)  # (1, batch, heads, head_dim), (1, batch, heads)
            loss = candidate_loss(q[0], weights[0], keys[layer], targets, mask, self.dtype, self.kind, self.gamma)
            losses.append(loss)
        return sum(losses) / len(losses)
