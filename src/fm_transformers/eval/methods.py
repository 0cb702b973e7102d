"""The rows of the comparison: one backbone, the same examples, decoded with different caches.

- "full": the stock cache (DynamicCache): the reference. Its run also records the native top-k picks at every
  decode step (oracle.NativePicks) for the oracle row.
- "lsa": LSA as the paper runs it: the memory indexer's OR over its target layers at threshold 0.5, no cap on
  the resident set, a recency tail and a sink.
- "recency (matched)", "random (matched)": the newest or random chunks, holding the bytes "lsa" held, example by
  example and recall by recall (matched.py).
- "lsa (budget)": the memory indexer under a fixed budget (chunks scoring at least `budget_threshold` compete,
  best first).
- "oracle lookahead": the union of the native top-k over the next tau steps of the "full" run, at the same
  budget (oracle.py, policies.OraclePolicy): the ceiling of any tau-step predictor.
- "native paging", "lsa + native paging": the refresh of LSAConfig.refresh_layers, without level-1 prediction
  and with the memory indexer: per-step demand paging by the native indexer over the whole history of its layers,
  a different algorithm from the paper's, with its own costs (whole-history scoring and a host sync at every
  step, fetches inside the window), which `PagingCache` counts.

Rows that need an earlier row's run (matched rows need "lsa", the oracle needs "full") read it from `shared`,
which the comparison fills batch by batch in row order.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..cache import OffloadedLookaheadCache
from ..config import LSAConfig
from ..layout import csa_compress_rate, csa_layers
from ..policies import MemoryIndexerPolicy, OraclePolicy, RecencyPolicy, ResidentPolicy
from .matched import MatchedPolicy, RecordingPolicy, matched_counts
from .oracle import lookahead_sets

PolicyFactory = Callable[[torch.nn.Module, dict], ResidentPolicy]


@dataclass(frozen=True)
class RowSettings:
    """The settings every row shares; `recency_chunks`, `budget_recency_chunks` and `budget_threshold` are the
    ones a validation run chooses (compare_methods.py --tune). The budgeted rows have a tail of their own: the
    tail counts against the budget, and the one that suits the uncapped row can take most of a short context's
    budget (at 2K, 33 of 51 chunks with a 32-chunk tail and the sink)."""

    tau: int = 64
    threshold: float = 0.5
    recency_chunks: int = 16
    sink_chunks: int = 1
    budget: float = 0.1
    budget_threshold: float = 0.0
    budget_recency_chunks: int | None = None  # the budgeted rows' tail; None: recency_chunks
    paging_layers: tuple[int, ...] | None = None  # None: the memory indexer's target layers
    seed: int = 0

    def cache_config(self, budget: bool = False, **extra) -> dict:
        """Cache options of the uncapped rows, or with `budget` of the budgeted ones (budget, their own tail)."""
        tail = self.recency_chunks
        if budget and self.budget_recency_chunks is not None:
            tail = self.budget_recency_chunks
        config = {"tau": self.tau, "recency_chunks": tail, "sink_chunks": self.sink_chunks, **extra}
        return {**config, "resident_budget": self.budget} if budget else config


@dataclass(frozen=True)
class Row:
    """A row: its name, and the cache options and policy of its LSA cache (None for both: the stock cache)."""

    name: str
    config: dict | None = None
    policy: PolicyFactory | None = None

    def make_cache(self, model, shared: dict) -> OffloadedLookaheadCache | None:
        if self.config is None:
            return None
        cache_class = PagingCache if self.config.get("refresh_layers") else OffloadedLookaheadCache
        return cache_class(model, self.config, policy=self.policy(model, shared))


class PagingCache(OffloadedLookaheadCache):
    """An LSA cache that counts its refresh checks: at each, one refresh layer scored its whole history (and the
    host waited for the device, to know whether anything was missing)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.refresh_checks = 0
        self.refresh_scored_chunks = 0

    def refresh_on_miss(self, layer_idx, picks):
        self.refresh_checks += 1
        self.refresh_scored_chunks += self.layers[layer_idx].num_chunks * picks.shape[0]
        super().refresh_on_miss(layer_idx, picks)

    def reset(self):
        super().reset()
        self.refresh_checks = self.refresh_scored_chunks = 0


# The native indexer's demand-paging rows: they read no other row's results, so they can run as a part of their own.
PAGING_ROWS = ("native paging", "lsa + native paging")


def paper_rows(indexer, settings: RowSettings, paging: bool = True) -> list[Row]:
    """Every row, in the order the comparison runs them (each after the rows it reads)."""
    paper = LSAConfig(**settings.cache_config())
    budgeted = LSAConfig(**settings.cache_config(budget=True))

    def lsa(model, shared):
        shared["lsa"] = RecordingPolicy(MemoryIndexerPolicy(indexer, threshold=settings.threshold), paper)
        return shared["lsa"]

    def matched(kind):
        def policy(model, shared):
            config = model.config
            counts = matched_counts(
                shared["lsa"].recorded, len(csa_layers(config)), len(indexer.config.layers), config.head_dim, config.index_head_dim
            )
            return MatchedPolicy(kind, counts, paper, seed=settings.seed + shared["batch"])

        return policy

    def oracle(model, shared):
        rate = csa_compress_rate(model.config)
        return OraclePolicy(lookahead_sets(shared["native_steps"], settings.tau, shared["prompt_length"], rate, budgeted))

    rows = [
        Row("full"),
        Row("lsa", settings.cache_config(), lsa),
        Row("recency (matched)", settings.cache_config(), matched("recency")),
        Row("random (matched)", settings.cache_config(), matched("random")),
        Row("lsa (budget)", settings.cache_config(budget=True), lambda m, s: MemoryIndexerPolicy(indexer, threshold=settings.budget_threshold)),
        Row("oracle lookahead", settings.cache_config(budget=True), oracle),
    ]
    if paging:
        layers = list(settings.paging_layers or indexer.config.layers)
        config = settings.cache_config(budget=True, refresh_layers=layers)
        rows += [
            Row(PAGING_ROWS[0], config, lambda m, s: RecencyPolicy(window=0)),
            Row(PAGING_ROWS[1], config, lambda m, s: MemoryIndexerPolicy(indexer, threshold=settings.budget_threshold)),
        ]
    return rows
