"""fm-transformers: Lookahead Sparse Attention for DeepSeek-V4 in Hugging Face Transformers.

Importing the package registers `cache_implementation="lsa"` with generate and the memory indexer with
AutoConfig/AutoModel.
"""

from .cache import OffloadedLookaheadCache
from .config import LSAConfig
from .hub import AutoLSAModelForCausalLM, attach_memory_indexer, detach_memory_indexer
from .indexer import MemoryIndexerConfig, MemoryIndexerModel, attached_memory_indexer
from .patch import apply_lsa_patch, enable_bounded_prefill, remove_lsa_patch
from .policies import (
    KeepAllPolicy,
    MemoryIndexerPolicy,
    OraclePolicy,
    PageRecallPolicy,
    RandomPolicy,
    RecencyPolicy,
    ResidentPolicy,
    SelectionContext,
)
from .report import format_memory_report

apply_lsa_patch()

__version__ = "0.1.0"

__all__ = [
    "AutoLSAModelForCausalLM",
    "KeepAllPolicy",
    "LSAConfig",
    "MemoryIndexerConfig",
    "MemoryIndexerModel",
    "MemoryIndexerPolicy",
    "OffloadedLookaheadCache",
    "OraclePolicy",
    "PageRecallPolicy",
    "RandomPolicy",
    "RecencyPolicy",
    "ResidentPolicy",
    "SelectionContext",
    "apply_lsa_patch",
    "attach_memory_indexer",
    "attached_memory_indexer",
    "detach_memory_indexer",
    "enable_bounded_prefill",
    "format_memory_report",
    "remove_lsa_patch",
]
