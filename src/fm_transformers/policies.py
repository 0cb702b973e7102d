"""Resident-set policies: which compressed chunks stay on the GPU until the next recall.

Every policy answers one question, `priorities(context)`: a (batch, chunks) score where -inf means "not
wanted" and larger means "keep first under a budget". The shared plumbing (`resident_sets`) adds the
recency tail and the sink, which are always resident, and applies the per-sequence budget. Page recall
(`PageRecallPolicy`) wraps any policy and turns its chunks into whole pages. The cache never knows which
policy it has; tests and the evaluation pick policies, not flags.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from transformers.utils import logging

from .config import DEFAULT_THRESHOLD, LSAConfig
from .indexer import attached_memory_indexer
from .kernels.level1_scoring import level1_scores
from .layout import csa_compress_rate

NOT_WANTED = float("-inf")
logger = logging.get_logger(__name__)


@dataclass
class SelectionContext:
    """What a policy may look at when a recall triggers."""

    num_chunks: int  # T: chunks in the cache at the trigger, the same for every sequence of the batch
    visible: torch.Tensor  # (batch,) chunk s is causally visible to sequence b iff s < visible[b]
    trigger_index: int  # 0 right after prefill, then 1, 2, ... every tau decode steps
    device: torch.device

    @property
    def batch_size(self) -> int:
        return self.visible.shape[0]

    def chunk_ids(self) -> torch.Tensor:
        return torch.arange(self.num_chunks, device=self.device)


class ResidentPolicy(ABC):
    """Base of all policies. Policies that read the model override `target_layers` and `observe`."""

    target_layers: tuple[int, ...] = ()

    def observe(self, layer_idx: int, hidden_states: torch.Tensor, position_ids: torch.Tensor, index_keys: torch.Tensor):
        """Called at a trigger step at each target layer, with the last token's hidden state (batch, hidden),
        its position (batch,) and that layer's full native indexer keys (batch, chunks, index_head_dim)."""

    @abstractmethod
    def priorities(self, context: SelectionContext) -> torch.Tensor:
        """(batch, chunks) float32: -inf for chunks not wanted, otherwise the keep-first order under a budget."""


class KeepAllPolicy(ResidentPolicy):
    """Every chunk resident: LSA then equals the stock model exactly."""

    def priorities(self, context):
        return torch.zeros(context.batch_size, context.num_chunks, device=context.device)


class RecencyPolicy(ResidentPolicy):
    """Only the newest `window` chunks (on top of the config's recency tail and sink)."""

    def __init__(self, window: int):
        if window < 0:
            raise ValueError(f"window must be >= 0, got {window}")
        self.window = window

    def priorities(self, context):
        ids = context.chunk_ids().float().expand(context.batch_size, -1)
        return torch.where(ids >= context.num_chunks - self.window, ids, NOT_WANTED)


class RandomPolicy(ResidentPolicy):
    """A random `fraction` of the history, drawn anew at each recall from a seeded generator."""

    def __init__(self, fraction: float, seed: int = 0):
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
        self.fraction = fraction
        self.generator = torch.Generator().manual_seed(seed)

    def priorities(self, context):
        noise = torch.rand(context.batch_size, context.num_chunks, generator=self.generator)
        keep = int(round(self.fraction * context.num_chunks))
        order = noise.argsort(dim=1, descending=True)
        wanted = torch.zeros_like(noise, dtype=torch.bool).scatter_(1, order[:, :keep], True)
        return torch.where(wanted, noise, NOT_WANTED).to(context.device)


class OraclePolicy(ResidentPolicy):
    """Given resident sets, one list of chunk-id tensors (one per sequence) per recall, in trigger order.

    Built from a stock run (the chunks the native top-k really used in the next tau steps), it bounds what
    any predictor can achieve; with chunks removed it shows the output depends on the resident set.
    """

    def __init__(self, sets_per_trigger: list[list[torch.Tensor]]):
        self.sets_per_trigger = sets_per_trigger

    def priorities(self, context):
        out = torch.full((context.batch_size, context.num_chunks), NOT_WANTED, device=context.device)
        if context.trigger_index >= len(self.sets_per_trigger):
            return out
        for row, ids in enumerate(self.sets_per_trigger[context.trigger_index]):
            ids = torch.as_tensor(ids, dtype=torch.long, device=context.device)
            out[row, ids[ids < context.num_chunks]] = 0.0
        return out


class MemoryIndexerPolicy(ResidentPolicy):
    """The LSA policy: chunks whose memory-indexer score reaches `threshold` in any target layer (max ensemble)."""

    def __init__(self, indexer, threshold: float | None = None, layers: tuple[int, ...] | None = None):
        available = tuple(indexer.config.layers)
        layers = available if layers is None else tuple(layers)
        missing = [layer for layer in layers if layer not in available]
        if missing:
            raise ValueError(f"indexer_layers {missing} have no memory indexer; the attached one covers {list(available)}")
        self.indexer = indexer
        self.threshold = DEFAULT_THRESHOLD if threshold is None else threshold
        self.target_layers = layers
        self._running_max: torch.Tensor | None = None  # (batch, chunks): max score over the layers seen so far

    @torch.no_grad()
    def observe(self, layer_idx, hidden_states, position_ids, index_keys):
        device = next(self.indexer.indexers[str(layer_idx)].parameters()).device
        q, weights = self.indexer.query(layer_idx, hidden_states[:, None].to(device), position_ids[:, None].to(device))
        rate = csa_compress_rate(self.indexer.config.backbone)
        visible = (position_ids.to(device) + 1) // rate  # chunks each sequence may see
        running_max = None if self._running_max is None else self._running_max.to(device)
        self._running_max = level1_scores(q[:, 0], weights[:, 0], index_keys.to(device), visible, running_max)

    def priorities(self, context):
        if self._running_max is None:
            raise RuntimeError("MemoryIndexerPolicy.priorities called before any target layer was observed")
        scores, self._running_max = self._running_max.to(context.device), None
        return torch.where(scores >= self.threshold, scores, NOT_WANTED)


class PageRecallPolicy(ResidentPolicy):
    """Page-granular recall around any policy: the densest pages of `page_chunks` chunks, recalled whole.

    A page's density is the number of its chunks that `inner` wants. Pages holding a recency or sink chunk are
    always kept whole and count against the budget (as in the release, where they take their share of its
    K_max pages); the rest of the budget goes to the densest pages with at least one wanted chunk (equal
    densities: lower page first). Every chunk of a kept page gets its page's density as priority, so a chunk
    budget after this (LSAConfig.resident_budget) drops the sparsest pages first. A refresh on a miss
    (`raise_picked_priorities`) adds single chunks: only the level-1 recalls are page-granular.
    """

    def __init__(self, inner: ResidentPolicy, page_chunks: int, budget_pages, recency_chunks: int, sink_chunks: int):
        """budget_pages: pages kept per sequence for a history of n pages (LSAConfig.budget_pages)."""
        self.inner, self.page_chunks, self.budget_pages = inner, page_chunks, budget_pages
        self.recency_chunks, self.sink_chunks = recency_chunks, sink_chunks
        self.target_layers = inner.target_layers

    def observe(self, layer_idx, hidden_states, position_ids, index_keys):
        self.inner.observe(layer_idx, hidden_states, position_ids, index_keys)

    def priorities(self, context):
        wanted_priorities = self.inner.priorities(context)  # (batch, chunks)
        size, num_chunks = self.page_chunks, context.num_chunks
        num_pages = -(-num_chunks // size)
        wanted = torch.isfinite(wanted_priorities).float()
        density = torch.nn.functional.pad(wanted, (0, num_pages * size - num_chunks)).view(-1, num_pages, size).sum(-1)
        pages = torch.arange(num_pages)
        forced = pages < -(-min(self.sink_chunks, num_chunks) // size)  # (pages,) on the host: no sync
        if self.recency_chunks:
            forced |= pages >= max(num_chunks - self.recency_chunks, 0) // size
        room = max(0, self.budget_pages(num_pages) - int(forced.sum()))
        forced = forced.to(density.device)
        candidates = (density > 0) & ~forced  # (batch, pages)
        order = density.masked_fill(~candidates, -1.0).argsort(dim=1, descending=True, stable=True)
        kept = (torch.zeros_like(candidates).scatter_(1, order[:, :room], True) & candidates) | forced
        kept_chunks = kept.repeat_interleave(size, dim=1)[:, :num_chunks]
        return torch.where(kept_chunks, density.repeat_interleave(size, dim=1)[:, :num_chunks], NOT_WANTED)


def resident_sets(priorities: torch.Tensor, context: SelectionContext, config: LSAConfig) -> list[torch.Tensor]:
    """Per sequence, the sorted chunk ids to keep resident: wanted chunks, plus recency tail and sink, capped.

    The tail and the sink are always kept; the budget, if any, then admits wanted chunks by priority (equal
    priorities: lower chunk id first). All sequences at once, with two host syncs in all: this runs at every
    trigger and, with refresh layers, at every refresh.
    """
    num_chunks = context.num_chunks
    ids = context.chunk_ids()
    forced = (ids >= num_chunks - config.recency_chunks) | (ids < config.sink_chunks)  # (chunks,)
    wanted = torch.isfinite(priorities) & ~forced  # (batch, chunks)
    budget = config.budget_chunks(num_chunks)
    if budget is not None:
        room = max(0, budget - min(num_chunks, config.recency_chunks + config.sink_chunks))  # minus the forced
        order = priorities.masked_fill(~wanted, NOT_WANTED).argsort(dim=1, descending=True, stable=True)
        admitted = torch.zeros_like(wanted).scatter_(1, order[:, :room], True)
        wanted &= admitted
    keep = wanted | forced
    counts = keep.sum(dim=1).tolist()
    return list(keep.nonzero()[:, 1].split(counts))


def policy_from_config(model, config: LSAConfig, policy: ResidentPolicy | None = None) -> ResidentPolicy:
    """The policy an LSA cache runs: `policy` when given, else the attached memory indexer configured by
    `config.threshold` / `config.indexer_layers`. Those two configure the default policy only, so giving them
    beside a policy is an error rather than silently ignored. With `config.page_chunks` either one is wrapped
    in a PageRecallPolicy."""
    chosen = _chunk_policy(model, config, policy)
    if config.page_chunks is None:
        return chosen
    return PageRecallPolicy(chosen, config.page_chunks, config.budget_pages, config.recency_chunks, config.sink_chunks)


def _chunk_policy(model, config: LSAConfig, policy: ResidentPolicy | None) -> ResidentPolicy:
    if policy is not None:
        given = config.policy_options_set()
        if given:
            raise ValueError(
                f"cache option(s) {given} configure the default memory-indexer policy, but a policy was passed "
                f"({type(policy).__name__}): set them on the policy instead, e.g. MemoryIndexerPolicy(indexer, threshold=...)"
            )
        return policy
    indexer = attached_memory_indexer(model)
    if indexer is None:
        raise ValueError(
            "no memory indexer is attached to this model: call fm_transformers.attach_memory_indexer(model, "
            "'<indexer repo or dir>') first, or pass a policy (cache_config={'policy': ...} or "
            "OffloadedLookaheadCache(model, policy=...))"
        )
    trained_tau = getattr(indexer.config, "tau", None)
    if trained_tau is not None and trained_tau != config.tau:
        logger.warning(
            "the memory indexer was trained for tau=%d, the cache runs tau=%d: it predicts the chunks of a %d-step "
            "window, so set cache_config={'tau': %d} unless you mean it", trained_tau, config.tau, trained_tau, trained_tau
        )
    return MemoryIndexerPolicy(indexer, threshold=config.threshold, layers=config.indexer_layers)


def raise_picked_priorities(priorities: torch.Tensor, picks: torch.Tensor, horizon: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Refresh on a miss: lift a refresh layer's native picks above every priority so far, in their own order.

    priorities (batch, horizon) fp32, the last trigger's (raised by earlier refreshes); picks (batch, k) chunk
    ids in descending native score, -1 padded. Picks at or past `horizon` are in the tail, candidates already,
    and are left out. Returns (new priorities (batch, horizon), below (batch, k): which picks count). So under a
    budget the chunks used longest ago leave first, the last trigger's unused choices before them. No host sync.
    """
    highest = priorities.masked_fill(~torch.isfinite(priorities), 0.0).max().clamp(min=0.0)
    rank_priority = highest + 1.0 + torch.arange(picks.shape[1], 0, -1, device=picks.device, dtype=torch.float32)
    below = (picks >= 0) & (picks < horizon)
    with_spare = torch.cat([priorities, priorities.new_zeros(picks.shape[0], 1)], dim=1)  # column `horizon`: discard
    with_spare.scatter_(1, torch.where(below, picks, horizon), rank_priority.expand_as(picks).contiguous())
    return with_spare[:, :horizon], below


def all_resident(picks: torch.Tensor, below: torch.Tensor, resident: list[torch.Tensor], horizon: int) -> bool:
    """Whether every counted pick (picks[b][below[b]]) is in resident[b], for all sequences in one host sync."""
    rows = torch.arange(picks.shape[0], device=picks.device)
    stride = max(horizon, 1)
    resident_keys = torch.cat(
        [ids.to(picks.device) + row * stride for row, ids in enumerate(resident)]
    ) if resident else picks.new_empty(0)
    pick_keys = (rows.unsqueeze(1) * stride + picks)[below]
    return bool(torch.isin(pick_keys, resident_keys).all())


def same_sets(first: list[torch.Tensor], second: list[torch.Tensor]) -> bool:
    """Whether two resident sets (one sorted id tensor per sequence) are equal, in one host sync."""
    if len(first) != len(second):
        return False
    sizes = torch.tensor([[a.numel(), b.numel()] for a, b in zip(first, second)])
    if not torch.equal(sizes[:, 0], sizes[:, 1]):
        return False
    device = first[0].device if first else None
    return torch.equal(torch.cat(first), torch.cat([ids.to(device) for ids in second]))
