"""Golden labels for the memory indexer, computed from the native indexer's scores (REFERENCE.md section 3).

For decode token t and CSA layer l: the native scores over the chunks visible to t (chunk s is visible iff
s < (t + 1) // compress_rate), their top-k, a softmax over those k logits, and the nucleus that reaches the
probability mass `nucleus`. A chunk is golden for t if it survives in at least `vote` CSA layers. The positive set
of a trigger step t is the union of the golden sets of tokens t .. t + tau - 1, restricted to chunks visible at t.
A chunk is golden for a window at vote v iff one of its tokens keeps it in at least v layers, so the window's most
layers per chunk (LookaheadUnion with reduce="max") serves every vote from one pass over the backbone.

Everything here is pure tensor math on one chunk of tokens at a time: no function ever needs the whole
sequence x history score matrix, which is what lets the dump run over documents of any length.
Ties are broken the same way everywhere: among equal scores the earlier chunk ranks first (a stable sort), and
the nucleus keeps every top-k chunk whose probability equals that of the chunk crossing the mass, so a label
never depends on the order in which tied chunks happen to be listed.
"""

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelConfig:
    """The label hyper-parameters; the defaults are the paper's release settings.

    warmup: the first trigger step (tokens before it are context only). None means the backbone's sliding
    window, the point from which compressed chunks are the only way to reach the past.
    """

    tau: int = 64
    nucleus: float = 0.6
    vote: int = 3
    warmup: int | None = None

    def __post_init__(self):
        if self.tau < 1:
            raise ValueError(f"tau must be at least 1 (tokens per lookahead window), got {self.tau}")
        if not 0.0 < self.nucleus <= 1.0:
            raise ValueError(f"nucleus must be a probability mass in (0, 1], got {self.nucleus}")
        if self.vote < 1:
            raise ValueError(f"vote must be at least 1 CSA layer, got {self.vote}")
        if self.warmup is not None and self.warmup < 0:
            raise ValueError(f"warmup must be a token count >= 0, got {self.warmup}")

    def resolved_warmup(self, sliding_window: int) -> int:
        return sliding_window if self.warmup is None else self.warmup


def effective_vote(vote: int, num_csa_layers: int) -> int:
    """The vote actually applied: a backbone with fewer CSA layers than the vote could never produce a label."""
    if num_csa_layers < 1:
        raise ValueError("the backbone has no CSA layer: memory-indexer labels need a DeepSeek-V4 with CSA layers")
    if vote > num_csa_layers:
        logger.warning(
            "the vote (%d layers) exceeds the backbone's %d CSA layers: using a vote of %d (every CSA layer)",
            vote,
            num_csa_layers,
            num_csa_layers,
        )
        return num_csa_layers
    return vote


def visible_chunks(positions: torch.Tensor, compress_rate: int) -> torch.Tensor:
    """How many compressed chunks a token at each position may see (the stock model's causality rule)."""
    return (positions + 1) // compress_rate


def trigger_positions(seq_len: int, warmup: int, tau: int) -> torch.Tensor:
    """Trigger steps warmup, warmup + tau, ... whose whole lookahead window lies inside the document."""
    return torch.arange(warmup, max(warmup, seq_len - tau + 1), tau, dtype=torch.long)


def nucleus_top_k(
    scores: torch.Tensor, positions: torch.Tensor, top_k: int, compress_rate: int, mass: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, the native top-k chunks and which of them are in the nucleus of their softmax.

    scores: (tokens, chunks) native indexer logits before the causal mask; positions: (tokens,).
    Returns indices (tokens, k) and keep (tokens, k); keep is False for slots past the visible chunks.
    """
    num_chunks = scores.shape[-1]
    k = min(top_k, num_chunks)
    if k == 0:
        empty = torch.zeros((scores.shape[0], 0), dtype=torch.long, device=scores.device)
        return empty, empty.bool()
    visible = visible_chunks(positions, compress_rate).unsqueeze(-1)  # (tokens, 1)
    future = torch.arange(num_chunks, device=scores.device) >= visible
    masked = scores.float().masked_fill(future, float("-inf"))
    values, indices = torch.sort(masked, dim=-1, descending=True, stable=True)
    values, indices = values[:, :k], indices[:, :k]
    valid = torch.isfinite(values)
    probs = torch.softmax(values, dim=-1).nan_to_num(0.0)  # rows with nothing visible give NaN
    before = torch.cumsum(probs, dim=-1) - probs  # mass strictly before each slot
    keep = (before < mass) & valid
    floor = torch.where(keep, probs, torch.full_like(probs, float("inf"))).amin(dim=-1, keepdim=True)
    keep = (keep | (probs >= floor)) & valid  # ties with the crossing chunk stay in
    return indices, keep


def layer_votes(per_layer: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token row, chunk, votes) triples, one per pair kept by at least one layer: votes counts the layers whose
    nucleus holds the chunk for that token, so any vote is a filter on them (vote_golden)."""
    rows, chunks = _kept_pairs(per_layer)
    if rows.numel() == 0:
        return rows, chunks, rows
    width = int(chunks.max()) + 1
    keys, counts = torch.unique(rows * width + chunks, return_counts=True)
    return keys // width, keys % width, counts


def vote_golden(per_layer: list[tuple[torch.Tensor, torch.Tensor]], vote: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token row, chunk) pairs that are in the nucleus of at least `vote` layers, as two 1-D tensors."""
    rows, chunks, votes = layer_votes(per_layer)
    kept = votes >= vote
    return rows[kept], chunks[kept]


def picked_pairs(per_layer_indices: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (token row, chunk) pick of the native top-k, one entry per layer that made it.

    -1 marks an empty slot, as in transformers. Repeats are kept on purpose: the count of picks is what
    says how much a chunk was used.
    """
    return _kept_pairs([(indices, indices >= 0) for indices in per_layer_indices])


def _kept_pairs(per_layer: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    rows, chunks = [], []
    for indices, keep in per_layer:
        token_rows = torch.arange(indices.shape[0], device=indices.device).unsqueeze(-1).expand_as(indices)
        rows.append(token_rows[keep])
        chunks.append(indices[keep])
    if not rows:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    return torch.cat(rows).long(), torch.cat(chunks).long()


class LookaheadUnion:
    """Accumulates per-token chunk sets of one document into one set per trigger step (CSR at the end).

    Tokens arrive chunk by chunk in any number of calls; each token belongs to at most one lookahead window
    (windows are tau long and start tau apart), so only (window, chunk) pairs with a value are kept, never a
    token x chunk matrix. A pair's value joins those of the window's tokens by `reduce`: "sum" (how often the
    chunk was picked; a pair counts 1 unless given a value) or "max" (the most layers that kept it at one token,
    which is what a vote over the window asks). Invariant: a stored chunk is always visible at its trigger
    step (causality), whatever the tokens of the window report.
    """

    def __init__(self, triggers: torch.Tensor, tau: int, compress_rate: int, reduce: str = "sum"):
        if reduce not in ("sum", "max"):
            raise ValueError(f"reduce must be 'sum' or 'max', got {reduce!r}")
        self.triggers = triggers
        self.tau = tau
        self.reduce = reduce
        self.limits = visible_chunks(triggers, compress_rate)  # (windows,)
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        self._width = int(self.limits.max()) + 1 if triggers.numel() else 1

    def add(self, positions: torch.Tensor, chunks: torch.Tensor, values: torch.Tensor | None = None) -> None:
        """positions, chunks (and values, default 1 each): 1-D, one (token position, chunk) pair per entry."""
        if positions.numel() == 0 or self.triggers.numel() == 0:
            return
        positions, chunks = positions.cpu(), chunks.cpu()
        values = torch.ones_like(chunks) if values is None else values.cpu().long()
        window = torch.searchsorted(self.triggers, positions, right=True) - 1
        inside = (window >= 0) & (positions < self.triggers[window.clamp(min=0)] + self.tau)
        window, chunks, values = window[inside], chunks[inside], values[inside]
        existing = chunks < self.limits[window]
        keys, inverse = torch.unique(window[existing] * self._width + chunks[existing], return_inverse=True)
        self._keys.append(keys)
        self._values.append(reduce_groups(values[existing], inverse, keys.numel(), self.reduce))

    def to_csr(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """indptr (windows + 1,), indices (nnz,) sorted ascending within each window, values (nnz,)."""
        if self._keys:
            keys, inverse = torch.unique(torch.cat(self._keys), return_inverse=True)
            values = reduce_groups(torch.cat(self._values), inverse, keys.numel(), self.reduce)
        else:
            keys = values = torch.zeros(0, dtype=torch.long)
        window, chunks = keys // self._width, keys % self._width
        indptr = torch.zeros(self.triggers.numel() + 1, dtype=torch.long)
        indptr[1:] = torch.cumsum(torch.bincount(window, minlength=self.triggers.numel()), dim=0)
        return indptr, chunks, values


def reduce_groups(values: torch.Tensor, groups: torch.Tensor, size: int, how: str) -> torch.Tensor:
    """Per group (0..size-1), the sum or the max of its values."""
    out = torch.zeros(size, dtype=torch.long)
    if how == "sum":
        return out.index_add_(0, groups, values)
    return out.scatter_reduce_(0, groups, values, reduce="amax", include_self=False)
