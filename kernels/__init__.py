"""Triton kernels of LSA decode, each beside the pure-torch reference that specifies it.

Imports torch and triton only (never transformers). Without triton the package still imports, HAS_TRITON is
False and every public op runs its reference. With triton, an op launches its kernel on CUDA tensors and
runs its reference on CPU tensors; the tests call the `*_triton` launchers directly (under TRITON_INTERPRET on
CPU) to check each kernel against its reference.
"""

from ._backend import HAS_TRITON
from .gather import (
    gather_chunks,
    gather_chunks_copy,
    gather_chunks_reference,
    gather_chunks_triton,
    gather_slab_chunks,
    gather_slab_chunks_reference,
    gather_slab_chunks_triton,
    slab_addresses,
)
from .level1_scoring import level1_scores, level1_scores_reference, level1_scores_triton, select_over_threshold
from .level2_topk import level2_topk, level2_topk_reference, level2_topk_triton
from .sparse_decode_attention import (
    sparse_decode_attention,
    sparse_decode_attention_reference,
    sparse_decode_attention_triton,
)

__all__ = [
    "HAS_TRITON",
    "gather_chunks",
    "gather_chunks_copy",
    "gather_chunks_reference",
    "gather_chunks_triton",
    "gather_slab_chunks",
    "gather_slab_chunks_reference",
    "gather_slab_chunks_triton",
    "slab_addresses",
    "level1_scores",
    "level1_scores_reference",
    "level1_scores_triton",
    "level2_topk",
    "level2_topk_reference",
    "level2_topk_triton",
    "select_over_threshold",
    "sparse_decode_attention",
    "sparse_decode_attention_reference",
    "sparse_decode_attention_triton",
]
