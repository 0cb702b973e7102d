"""LSAConfig: the options of Lookahead Sparse Attention, validated once at the edge.

`generate(..., cache_implementation="lsa", cache_config={...})` builds one from a dict; unknown keys and
out-of-range values are errors that say which option and what is allowed. `{"preset": name}` starts from a
named set of options (PRESETS); keys given beside it override the preset's.
"""

import math
from dataclasses import dataclass, fields

import torch

_POOL_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float8_e4m3fn": torch.float8_e4m3fn,  # e4m3 codes + one fp32 scale per entry (see fp8.py)
}
DEFAULT_THRESHOLD = 0.5
# Pages recalled per sequence when page recall is on and no page_budget is given: 96 pages per 256K tokens of
# history (1024 pages of 64 chunks), the release's 96 / 192 / 384 pages at 256K / 512K / 1M, about 10%.
DEFAULT_PAGE_BUDGET = 96 / 1024
# The paper release's decode settings (`launch_decode.sh`): every 64 steps, a recency tail of the last 2048
# compressed entries, no sink, whole pages of 64 chunks, the densest DEFAULT_PAGE_BUDGET of them (page_budget
# left at None, so that page_chunks=None beside the preset turns page recall off). Its threshold 0.5 and OR over
# the target layers are the default policy's (threshold left at None, so the preset also works beside a policy).
PRESETS = {
    "official": dict(tau=64, recency_chunks=2048, sink_chunks=0, page_chunks=64),
}
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
    pool_dtype: dtype of the CPU cold pool ("float32", "bfloat16", "float16", "float8_e4m3fn"); None keeps the
        model's dtype, which makes the pool a byte-for-byte copy of what the stock cache holds. "float8_e4m3fn"
        stores each entry as e4m3 codes and one fp32 scale (the release's layout), about half the host and
        recall bytes of bf16; recalled entries come back dequantized to the model's dtype.
    page_chunks: recall whole pages of this many chunks (the release: 64): the policy's chosen chunks are
        counted per page and the densest pages are recalled whole, recency and sink pages always. None: the
        policy's chunks themselves (chunk-granular recall).
    page_budget: pages recalled per sequence, as a count (int >= 1) or a fraction of the history's pages (float
        in (0, 1], rounded up); the recency and sink pages count against it. None: DEFAULT_PAGE_BUDGET. Only with
        page_chunks.
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
    page_chunks: int | None = None
    page_budget: int | float | None = None

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
        self._validate_pages()
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

    def _validate_pages(self):
        size, budget = self.page_chunks, self.page_budget
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
            raise ValueError(f"page_chunks must be a positive integer (chunks per recalled page) or None, got {size!r}")
        if budget is None:
            return
        if size is None:
            raise ValueError(f"page_budget={budget!r} needs page recall: set page_chunks too (the release uses 64)")
        if isinstance(budget, bool) or not isinstance(budget, (int, float)):
            raise ValueError(f"page_budget must be a page count, a fraction in (0, 1], or None; got {budget!r}")
        if isinstance(budget, int) and budget < 1:
            raise ValueError(f"page_budget as a page count must be >= 1, got {budget}")
        if isinstance(budget, float) and not 0.0 < budget <= 1.0:
            raise ValueError(f"page_budget as a fraction of the history's pages must lie in (0, 1], got {budget}")

    @classmethod
    def from_dict(cls, options: dict | None) -> "LSAConfig":
        """Build from generate's `cache_config`; any key that is not an option is an error. A "preset" key
        starts from that preset (see `from_preset`)."""
        options = dict(options or {})
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(options) - known - {"preset"})
        if unknown:
            raise ValueError(
                f"unknown cache_config key(s) {unknown} for cache_implementation='lsa'; known: {sorted(known | {'preset'})}"
            )
        if "preset" in options:
            return cls.from_preset(options.pop("preset"), **options)
        return cls(**options)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "LSAConfig":
        """The options of preset `name` (PRESETS), with `overrides` replacing any of them."""
        if not isinstance(name, str) or name not in PRESETS:
            raise ValueError(f"unknown cache_config preset {name!r}; known presets: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

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

    def budget_pages(self, num_pages: int) -> int:
        """Pages recalled per sequence for a history of `num_pages` pages (page recall only)."""
        budget = DEFAULT_PAGE_BUDGET if self.page_budget is None else self.page_budget
        if isinstance(budget, float):
            return max(1, math.ceil(budget * num_pages))
        return budget

    def torch_pool_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return model_dtype if self.pool_dtype is None else _POOL_DTYPES[self.pool_dtype]
