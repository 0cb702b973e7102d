"""The training loss of the memory indexer: binary cross-entropy over candidate chunks, focal by default.

Positives are a small fraction of a document's chunks even after negative sampling, and most sampled
negatives are easy; the focal factor (1 - p_t)^gamma (gamma = 2 in the paper's release) spends the gradient
on the chunks the indexer still gets wrong. gamma = 0 is plain BCE.
"""

import torch
import torch.nn.functional as F

LOSSES = ("focal", "bce")


def indexer_loss(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, kind: str = "focal", gamma: float = 2.0
) -> torch.Tensor:
    """Mean loss over real (mask = 1) candidates; logits, targets, mask: (batch, candidates)."""
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}: choose one of {LOSSES}")
    logits = logits.float()
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    if kind == "focal":
        probs = torch.sigmoid(logits)
        p_true = probs * targets + (1 - probs) * (1 - targets)
        loss = (1 - p_true).pow(gamma) * loss
    return (loss * mask).sum() / mask.sum().clamp(min=1)
