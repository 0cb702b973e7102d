"""Level-2 selection: the native Lightning Indexer scored over resident candidates only, then its top-k.

Every decode step, in every CSA layer, LSA runs the stock indexer but only over the chunks resident on the
GPU (the candidates), which is where the per-token FLOP saving of LSA comes from:

    score[b, c] = sum_h weights[b, h] * relu(q[b, h] . key_slots[cand_slots[b, c]]) * softmax_scale   (fp32)

q (B, H, Dk); weights (B, H); key_slots (N, Dk) the layer's indexer keys of the resident slots; cand_slots
(B, C) slot indices padded with -1; cand_limit an optional (B, C) bool mask (False = excluded, e.g. a chunk
the query may not see yet). An excluded or padded candidate scores -inf. The result is top_pos (B, kk),
kk = min(k, C), positions INTO the candidate list (-1 where fewer than k candidates are valid), and
top_scores (B, kk), sorted descending.

The kernel computes the scores (one gathered tile of candidate keys against all heads); the selection is
`torch.topk`. At real sizes the selection, not the scoring, is the larger cost (H100, B=4, C=16K, k=512:
about 19 us of scoring, 95 us of topk); a fused selection kernel is the next step if level 2 shows up in
profiles. The dot products run as 3xTF32 on tensor cores: fp32-accurate (about 1e-6 relative, the size of
fp32 summation-order noise), like the stock scorer's fp32 matmul, so the picks match the full-cache model's
except between near-ties.
"""

import torch

from ._backend import block_size, require_triton, runs_triton, tl, triton
from ._scoring import relu_weighted_dots


@triton.jit
def _level2_scores_kernel(
    q_ptr,  # (B, H, DK) contiguous
    w_ptr,  # (B, H) contiguous
    slots_ptr,  # (N, DK) strided
    cand_ptr,  # (B, C) contiguous, -1 = no candidate
    out_ptr,  # (B, C) fp32 contiguous
    C,
    H,
    DK,
    softmax_scale,
    stride_sn,
    stride_sd,
    BLOCK_C: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    h = tl.arange(0, BLOCK_H)
    slot = tl.load(cand_ptr + b * C + c, mask=c < C, other=-1).to(tl.int64)
    valid = slot >= 0
    w = tl.load(w_ptr + b * H + h, mask=h < H, other=0.0).to(tl.float32)
    terms = relu_weighted_dots(
        q_ptr + b * H * DK + h * DK,
        h < H,
        w,
        slots_ptr + slot * stride_sn,
        valid,
        stride_sd,
        DK,
        softmax_scale,
        BLOCK_H,
        BLOCK_C,
        BLOCK_D,
        True,
        "tf32x3",
    )  # (BLOCK_H, BLOCK_C)
    score = tl.sum(terms, axis=0)  # (BLOCK_C,)
    tl.store(out_ptr + b * C + c, tl.where(valid, score, float("-inf")), mask=c < C)


def _visible_candidates(cand_slots: torch.Tensor, cand_limit: torch.Tensor | None) -> torch.Tensor:
    """Fold the optional validity mask into the slot list: an excluded candidate becomes padding (-1)."""
    if cand_limit is None:
        return cand_slots
    return cand_slots.masked_fill(~cand_limit, -1)


def _select_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    top_scores, top_pos = scores.topk(min(k, scores.shape[-1]), dim=-1)  # (B, kk)
    return top_pos.masked_fill(top_scores == float("-inf"), -1), top_scores


def level2_scores_triton(
    q: torch.Tensor,
    weights: torch.Tensor,
    key_slots: torch.Tensor,
    cand_slots: torch.Tensor,
    cand_limit: torch.Tensor | None,
    softmax_scale: float,
) -> torch.Tensor:
    """Triton launcher of the level-2 scores (B, C) fp32; runs under TRITON_INTERPRET on CPU tensors too."""
    require_triton("level2_scores")
    cand = _visible_candidates(cand_slots, cand_limit).contiguous()
    batch, heads, dk = q.shape
    n_cand = cand.shape[1]
    scores = torch.empty(batch, n_cand, dtype=torch.float32, device=q.device)
    block_c = 128
    _level2_scores_kernel[(batch, triton.cdiv(n_cand, block_c))](
        q.contiguous(),
        weights.contiguous(),
        key_slots,
        cand,
        scores,
        n_cand,
        heads,
        dk,
        float(softmax_scale),
        *key_slots.stride(),
        BLOCK_C=block_c,
        BLOCK_H=block_size(heads),
        BLOCK_D=min(block_size(dk), 32),
        num_warps=8,
    )
    return scores


def level2_scores_reference(
    q: torch.Tensor,
    weights: torch.Tensor,
    key_slots: torch.Tensor,
    cand_slots: torch.Tensor,
    cand_limit: torch.Tensor | None,
    softmax_scale: float,
) -> torch.Tensor:
    """The level-2 scores (B, C) fp32 in plain torch, in the stock scorer's order of operations."""
    cand = _visible_candidates(cand_slots, cand_limit)
    keys = key_slots[cand.clamp(min=0)].float()  # (B, C, Dk)
    dots = torch.einsum("bhd,bcd->bhc", q.float(), keys)  # (B, H, C)
    scores = (dots.relu() * softmax_scale * weights.float()[:, :, None]).sum(dim=1)  # (B, C)
    return scores.masked_fill(cand < 0, float("-inf"))


def level2_topk_triton(
    q: torch.Tensor,
    weights: torch.Tensor,
    key_slots: torch.Tensor,
    cand_slots: torch.Tensor,
    cand_limit: torch.Tensor | None,
    k: int,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`level2_topk` with the scores from the Triton kernel and the selection from torch.topk."""
    return _select_topk(level2_scores_triton(q, weights, key_slots, cand_slots, cand_limit, softmax_scale), k)


def level2_topk_reference(
    q: torch.Tensor,
    weights: torch.Tensor,
    key_slots: torch.Tensor,
    cand_slots: torch.Tensor,
    cand_limit: torch.Tensor | None,
    k: int,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The spec of `level2_topk` in plain torch."""
    return _select_topk(level2_scores_reference(q, weights, key_slots, cand_slots, cand_limit, softmax_scale), k)


def level2_topk(
    q: torch.Tensor,
    weights: torch.Tensor,
    key_slots: torch.Tensor,
    cand_slots: torch.Tensor,
    cand_limit: torch.Tensor | None,
    k: int,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k resident candidates by native indexer score: (top_pos (B, kk) int64, top_scores (B, kk) fp32).

    top_pos indexes the candidate list (map it to slots with `cand_slots.gather(1, top_pos.clamp(min=0))`);
    -1 marks a pick past the last valid candidate. The Triton kernel runs on CUDA tensors, the reference
    otherwise.
    """
    if runs_triton(key_slots):
        return level2_topk_triton(q, weights, key_slots, cand_slots, cand_limit, k, softmax_scale)
    return level2_topk_reference(q, weights, key_slots, cand_slots, cand_limit, k, softmax_scale)
