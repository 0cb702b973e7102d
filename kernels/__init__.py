"""Triton kernels of LSA prefill and decode, each beside the pure-torch reference that specifies it.

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
from .indexer_topk import indexer_topk, indexer_topk_reference, indexer_topk_triton
from .level1_scoring import level1_scores, level1_scores_reference, level1_scores_triton
from .level2_topk import level2_topk, level2_topk_reference, level2_topk_triton
from .sparse_decode_attention import (
    sparse_decode_attention,
    sparse_decode_attention_reference,
    sparse_decode_attention_triton,
)
from .sparse_prefill_attention import (
    band_bias,
    sparse_prefill_attention,
    sparse_prefill_attention_reference,
    sparse_prefill_attention_triton,
    window_band,
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
    "indexer_topk",
    "indexer_topk_reference",
    "indexer_topk_triton",
    "level1_scores",
    "level1_scores_reference",
    "level1_scores_triton",
    "level2_topk",
    "level2_topk_reference",
    "level2_topk_triton",
    "sparse_decode_attention",
    "sparse_decode_attention_reference",
    "sparse_decode_attention_triton",
    "band_bias",
    "sparse_prefill_attention",
    "sparse_prefill_attention_reference",
    "sparse_prefill_attention_triton",
    "window_band",
]
