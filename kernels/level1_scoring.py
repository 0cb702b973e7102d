"""Level-1 scoring: the memory indexer over the whole history of one target layer, fused with the union.

Every tau decode steps LSA scores ALL compressed chunks of each target layer (10, 12, 20 in V4-Flash) with the
trained memory indexer and keeps a chunk if it clears the threshold in at least one layer:

    score[b, t] = sigmoid( sum_h weights[b, h] * relu(q[b, h] . keys[b, t]) )      (fp32)
    running_max = max(running_max, score)                                           (the union over layers)

q (B, H, Dk) is already RoPE'd, weights (B, H) already scaled, keys (B, T, Dk) are the layer's frozen native
indexer keys, and chunks t >= valid_len[b] (padding of shorter sequences) score -inf so that no threshold
picks them. Keeping a running max instead of per-layer masks fuses the union into the scoring pass, and the
final `running_max >= threshold` is one torch op with no host sync (the decode step stays graph-capturable).
"""

import torch

from ._backend import block_size, require_triton, runs_triton, tl, triton
from ._scoring import relu_weighted_dots


@triton.jit
def _level1_kernel(
    q_ptr,  # (B, H, DK) contiguous
    w_ptr,  # (B, H) contiguous
    keys_ptr,  # (B, T, DK) strided
    len_ptr,  # (B,)
    out_ptr,  # (B, T) fp32 contiguous, updated in place
    T,
    H,
    DK,
    stride_kb,
    stride_kt,
    stride_kd,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.arange(0, BLOCK_H)
    in_t = t < T
    w = tl.load(w_ptr + b * H + h, mask=h < H, other=0.0).to(tl.float32)
    terms = relu_weighted_dots(
        q_ptr + b * H * DK + h * DK,
        h < H,
        w,
        keys_ptr + b * stride_kb + t * stride_kt,
        in_t,
        stride_kd,
        DK,
        1.0,
        BLOCK_H,
        BLOCK_T,
        BLOCK_D,
        True,
        "tf32x3",
    )  # (BLOCK_H, BLOCK_T)
    score = tl.sigmoid(tl.sum(terms, axis=0))  # (BLOCK_T,)
    score = tl.where(t < tl.load(len_ptr + b), score, float("-inf"))
    out = out_ptr + b * T + t
    tl.store(out, tl.maximum(tl.load(out, mask=in_t), score), mask=in_t)


def _running_max_or_new(running_max: torch.Tensor | None, keys: torch.Tensor) -> torch.Tensor:
    if running_max is None:
        return torch.full(keys.shape[:2], float("-inf"), dtype=torch.float32, device=keys.device)
    if running_max.dtype != torch.float32 or running_max.shape != keys.shape[:2]:
        raise ValueError(
            f"running_max must be float32 of shape {tuple(keys.shape[:2])} (batch, chunks), "
            f"got {running_max.dtype} {tuple(running_max.shape)}"
        )
    return running_max


def level1_scores_triton(
    q: torch.Tensor,
    weights: torch.Tensor,
    keys: torch.Tensor,
    valid_len: torch.Tensor,
    running_max: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton launcher of `level1_scores`; runs under TRITON_INTERPRET on CPU tensors too."""
    require_triton("level1_scores")
    running_max = _running_max_or_new(running_max, keys)
    if not running_max.is_contiguous():
        raise ValueError("running_max must be contiguous: it is updated in place")
    batch, heads, dk = q.shape
    chunks = keys.shape[1]
    block_t = 128
    grid = (batch, triton.cdiv(chunks, block_t))
    _level1_kernel[grid](
        q.contiguous(),
        weights.contiguous(),
        keys,
        valid_len,
        running_max,
        chunks,
        heads,
        dk,
        *keys.stride(),
        BLOCK_T=block_t,
        BLOCK_H=block_size(heads),
        BLOCK_D=min(block_size(dk), 32),
        num_warps=8,
    )
    return running_max


def level1_scores_reference(
    q: torch.Tensor,
    weights: torch.Tensor,
    keys: torch.Tensor,
    valid_len: torch.Tensor,
    running_max: torch.Tensor | None = None,
) -> torch.Tensor:
    """The spec of `level1_scores` in plain torch (materializes (B, H, T), fine for tests and CPU)."""
    running_max = _running_max_or_new(running_max, keys)
    dots = torch.einsum("bhd,btd->bht", q.float(), keys.float())  # (B, H, T)
    score = torch.sigmoid((dots.relu() * weights.float()[:, :, None]).sum(dim=1))  # (B, T)
    chunk = torch.arange(keys.shape[1], device=keys.device)
    score = score.masked_fill(chunk[None, :] >= valid_len.to(keys.device)[:, None], float("-inf"))
    return torch.maximum(running_max, score, out=running_max)


def level1_scores(
    q: torch.Tensor,
    weights: torch.Tensor,
    keys: torch.Tensor,
    valid_len: torch.Tensor,
    running_max: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fold one target layer's memory-indexer scores into `running_max` (B, T) fp32, in place, and return it.

    q: (B, H, Dk) float; weights: (B, H) float; keys: (B, T, Dk) bf16/fp16/fp32; valid_len: (B,) int.
    With `running_max=None` a fresh one filled with -inf is made. The Triton kernel runs on CUDA tensors, the
    reference otherwise. Its dot products run as 3xTF32 on tensor cores: fp32-accurate (about 1e-6
    relative) at a third of the cost of plain fp32 FMAs.
    """
    if runs_triton(keys):
        return level1_scores_triton(q, weights, keys, valid_len, running_max)
    return level1_scores_reference(q, weights, keys, valid_len, running_max)
