"""LSAConfig: the options of Lookahead Sparse Attention, validated once at the edge.

`generate(..., cache_implementation="lsa", cache_config={...})` builds one from a dict; unknown keys and
out-of-range values are errors that say which option and what is allowed.
"""

from dataclasses import dataclass, fields

import torch

_POOL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_THRESHOLD = 0.5
# Options that configure the default (memory-indexer) policy: an error beside an explicit policy.
POLICY_OPTIONS = ("threshold", "indexer_layers")


@dataclass(frozen=True)
class LSAConfig:
    """
    tau: decode steps between two level-1 recalls (the memory indexer's lookahead horizon).
    threshold: a chunk is kept when its memory-indexer score reaches it in any target layer; 0 keeps everything.
        None: DEFAULT_THRESHOLD (0.5). Configures the default policy only, so it is an error beside a policy.
    indexer_layers: the target layers to use, a subset of the attached indexer's (None: all of them); likewise
        for the default policy only.
    recency_chunks: newest chunks always resident (covers what a stale prediction misses).
    sink_chunks: first chunks always resident.
    resident_budget: per-sequence cap on resident chunks, as a count (int >= 1) or a fraction of the
        history (float in (0, 1]); the highest-scoring chunks are kept. None: no cap.
    pool_dtype: dtype of the CPU cold pool ("float32", "bfloat16", "float16"); None keeps the model's dtype,
        which makes the pool a byte-for-byte copy of what the stock cache holds.
    refresh_layers: CSA layers that refresh the resident set on a miss (None: none). Their indexer keys stay on
        the device in full; every decode step each of them runs the native indexer over the whole history, and
        chunks of its top-k that are not resident are fetched at once, ahead of the other chunks under the
        budget, before it reads its candidates. A lookahead made at one step cannot follow a chain of facts
        it has not read yet; a refresh can. It costs those layers' full native scoring and a host sync per step.
    prefill_chunk_size: tokens per forward of a long prompt under `generate` when generate's own
        `prefill_chunk_size` is not set (None: the whole prompt in one forward). Every prefill temporary is
        bounded by it; 4096 was chosen by measurement (docs/benchmarks.md, Prefill).
    prefill_progress: show a progress bar over the prefill chunks; None shows one when there are at least 8.
    cuda_graph: on CUDA, `generate` decodes through a captured CUDA graph of the whole model step
        (decode_graph.py); False decodes eagerly. Caches with `refresh_layers` always decode eagerly.
    """

    tau: int = 64
    threshold: float | None = None
    indexer_layers: tuple[int, ...] | None = None
    recency_chunks: int = 64
    sink_chunks: int = 4
    resident_budget: int | float | None = None
    pool_dtype: str | None = None
    refresh_layers: tuple[int, ...] | None = None
    prefill_chunk_size: int | None = 4096
    prefill_progress: bool | None = None
    cuda_graph: bool = True

    def __post_init__(self):
        if isinstance(self.tau, bool) or not isinstance(self.tau, int) or self.tau <= 0:
            raise ValueError(f"tau must be a positive integer (decode steps between recalls), got {self.tau!r}")
        if self.threshold is not None and (isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float))):
            raise ValueError(f"threshold must be a number in [0, 1], got {self.threshold!r}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1] (0 keeps every chunk), got {self.threshold}")
        for name in ("recency_chunks", "sink_chunks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        chunk = self.prefill_chunk_size
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0):
            raise ValueError(f"prefill_chunk_size must be a positive integer (tokens per forward) or None, got {chunk!r}")
        if self.prefill_progress is not None and not isinstance(self.prefill_progress, bool):
            raise ValueError(f"prefill_progress must be True, False or None (automatic), got {self.prefill_progress!r}")
        if not isinstance(self.cuda_graph, bool):
            raise ValueError(f"cuda_graph must be True or False, got {self.cuda_graph!r}")
        for name in ("indexer_layers", "refresh_layers"):
            self._validate_layers(name)
        self._validate_budget()
        if self.pool_dtype is not None and self.pool_dtype not in _POOL_DTYPES:
            raise ValueError(f"pool_dtype must be one of {sorted(_POOL_DTYPES)} or None, got {self.pool_dtype!r}")

    def _validate_layers(self, name: str):
        value = getattr(self, name)
        if value is None:
            return
        layers = tuple(value) if isinstance(value, (list, tuple)) else ()
        if not layers or not all(isinstance(layer, int) and not isinstance(layer, bool) for layer in layers):
            raise ValueError(f"{name} must be a non-empty list of layer indices, got {value!r}")
        object.__setattr__(self, name, layers)

    def _validate_budget(self):
        budget = self.resident_budget
        if budget is None:
            return
        if isinstance(budget, bool) or not isinstance(budget, (int, float)):
            raise ValueError(f"resident_budget must be a chunk count, a fraction in (0, 1], or None; got {budget!r}")
        if isinstance(budget, int) and budget < 1:
            raise ValueError(f"resident_budget as a chunk count must be >= 1, got {budget}")
        if isinstance(budget, float) and not 0.0 < budget <= 1.0:
            raise ValueError(f"resident_budget as a fraction must lie in (0, 1], got {budget}")

    @classmethod
    def from_dict(cls, options: dict | None) -> "LSAConfig":
        """Build from generate's `cache_config`; any key that is not an option is an error."""
        options = dict(options or {})
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown cache_config key(s) {unknown} for cache_implementation='lsa'; known: {sorted(known)}")
        return cls(**options)

    def policy_options_set(self) -> list[str]:
        """The options that configure the default policy and were given (not left at None)."""
        return [name for name in POLICY_OPTIONS if getattr(self, name) is not None]

    def budget_chunks(self, num_chunks: int) -> int | None:
        """The cap on resident chunks for a history of `num_chunks`, or None when there is no cap."""
        if self.resident_budget is None:
            return None
        if isinstance(self.resident_budget, float):
            return max(1, int(self.resident_budget * num_chunks))
        return self.resident_budget

    def torch_pool_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return model_dtype if self.pool_dtype is None else _POOL_DTYPES[self.pool_dtype]
