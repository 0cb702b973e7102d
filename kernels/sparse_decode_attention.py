"""Sparse decode attention of a CSA layer: one query per sequence over the window, the picked chunks and the sink.

In LSA decode the core attention of a CSA layer reads only the sliding window and the level-2 picks among the
resident chunks, never the whole compressed cache. K = V: one KV head shared by all query heads, so the kernel
reads each entry once for a block of heads instead of repeating it per head as the eager path does.

    q (B, H, D); window_kv (B, W, D); window_bias (B, W) fp32 additive (0 or -inf);
    comp_slots (N, D) the resident compressed entries; comp_idx (B, K) slot indices, -1 = skip;
    sinks (H,) fp32, one finite logit per head that joins the softmax denominator but carries no value.

    logits = [q . window_kv * scale + window_bias, q . comp_slots[comp_idx] * scale, sinks]
    out[b, h] = sum over window and chunks of softmax(logits)_j * v_j          (fp32 math, q.dtype out)

A decode batch is small (one query per sequence), so one program per (sequence, head block) would leave most
of the GPU idle: the entries [window, chunks] are cut into splits that run in parallel (flash-decoding), and a
second kernel merges their partial softmax states together with the sink. Every running max starts at the
sink logit instead of -inf, so a split, or a whole sequence, with nothing visible yields zeros, never NaN.
"""

import math

import torch

from ._backend import block_size, require_triton, runs_triton, tl, triton


@triton.jit
def _split_kernel(
    q_ptr,  # (B, H, D) contiguous
    win_ptr,  # (B, W, D), rows contiguous
    bias_ptr,  # (B, W) fp32 contiguous
    comp_ptr,  # (N, D), rows contiguous
    idx_ptr,  # (B, K) contiguous
    sink_ptr,  # (H,) fp32
    acc_ptr,  # (B, S, H, D) fp32: unnormalized sum of p * v per split
    m_ptr,  # (B, S, H) fp32: running max per split, log2 units
    sum_ptr,  # (B, S, H) fp32: sum of p per split
    H,
    D,
    W,
    K,
    S,
    split_len,
    qk_scale,
    stride_wb,
    stride_wn,
    stride_cn,
    DOT_PRECISION: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    h = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    in_h = h < H
    in_d = d < D
    q = tl.load(q_ptr + (b * H + h[:, None]) * D + d[None, :], mask=in_h[:, None] & in_d[None, :], other=0.0)
    m = tl.load(sink_ptr + h, mask=in_h, other=0.0) * 1.4426950408889634  # log2(e)
    sum_p = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
    start = split * split_len
    end = tl.minimum(start + split_len, W + K)
    for n0 in range(start, end, BLOCK_N):
        j = n0 + tl.arange(0, BLOCK_N)  # entry index: window rows first, then chunks
        in_split = j < end
        is_win = j < W
        slot = tl.load(idx_ptr + b * K + (j - W), mask=(j >= W) & in_split, other=-1).to(tl.int64)
        visible = (is_win & in_split) | (slot >= 0)
        bias = tl.load(bias_ptr + b * W + j, mask=is_win & in_split, other=0.0)
        bias = tl.where(visible, bias, float("-inf")) * 1.4426950408889634
        row = tl.where(is_win, win_ptr + b * stride_wb + j * stride_wn, comp_ptr + slot * stride_cn)
        kv = tl.load(row[:, None] + d[None, :], mask=visible[:, None] & in_d[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        s = tl.dot(q, tl.trans(kv), input_precision=DOT_PRECISION) * qk_scale + bias[None, :]  # (BLOCK_H, BLOCK_N)
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        sum_p = sum_p * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(kv.dtype), kv, input_precision=DOT_PRECISION)
        m = m_new
    state = (b * S + split) * H + h
    tl.store(m_ptr + state, m, mask=in_h)
    tl.store(sum_ptr + state, sum_p, mask=in_h)
    tl.store(acc_ptr + state[:, None] * D + d[None, :], acc, mask=in_h[:, None] & in_d[None, :])


@triton.jit
def _combine_kernel(
    acc_ptr,  # (B, S, H, D) fp32
    m_ptr,  # (B, S, H) fp32
    sum_ptr,  # (B, S, H) fp32
    sink_ptr,  # (H,) fp32
    out_ptr,  # (B, H, D) contiguous, q.dtype
    H,
    D,
    S,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_h = h < H
    mask = in_h[:, None] & (d[None, :] < D)
    m_all = tl.load(sink_ptr + h, mask=in_h, other=0.0) * 1.4426950408889634  # log2(e)
    denom = tl.full((BLOCK_H,), 1.0, dtype=tl.float32)  # the sink's mass, which carries no value
    out = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
    for split in range(0, S):
        state = (b * S + split) * H + h
        m_split = tl.load(m_ptr + state, mask=in_h, other=0.0)
        m_new = tl.maximum(m_all, m_split)
        alpha = tl.exp2(m_all - m_new)
        weight = tl.exp2(m_split - m_new)
        denom = denom * alpha + tl.load(sum_ptr + state, mask=in_h, other=0.0) * weight
        acc = tl.load(acc_ptr + state[:, None] * D + d[None, :], mask=mask, other=0.0)
        out = out * alpha[:, None] + acc * weight[:, None]
        m_all = m_new
    tl.store(out_ptr + (b * H + h[:, None]) * D + d[None, :], out / denom[:, None], mask=mask)


_BLOCK_H = 16
_BLOCK_N = 32
_TARGET_PROGRAMS = 264  # about two per SM of an H100 / H200 (132 SMs)
_COMBINE_BLOCK_H = 8
_COMBINE_BLOCK_D = 64


def sparse_decode_attention_triton(
    q: torch.Tensor,
    window_kv: torch.Tensor,
    window_bias: torch.Tensor,
    comp_slots: torch.Tensor,
    comp_idx: torch.Tensor,
    sinks: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Triton launcher of `sparse_decode_attention`; runs under TRITON_INTERPRET on CPU tensors too."""
    require_triton("sparse_decode_attention")
    if not q.dtype == window_kv.dtype == comp_slots.dtype:
        raise ValueError(
            f"q, window_kv and comp_slots must share one dtype (the kernel feeds them to one dot), got "
            f"{q.dtype}, {window_kv.dtype}, {comp_slots.dtype}: cast q to the cache dtype"
        )
    batch, heads, dim = q.shape
    window, picks = window_kv.shape[1], comp_idx.shape[1]
    # As many splits as fill the GPU, each a whole number of BLOCK_N entries; at least one, so that a
    # sequence with no entries at all still gets its (zero) output from the sink alone.
    entries = max(window + picks, 1)
    head_blocks = triton.cdiv(heads, _BLOCK_H)
    entry_blocks = triton.cdiv(entries, _BLOCK_N)
    splits = max(1, min(entry_blocks, _TARGET_PROGRAMS // (batch * head_blocks)))
    split_len = triton.cdiv(entry_blocks, splits) * _BLOCK_N
    splits = triton.cdiv(entries, split_len)
    window_kv = window_kv if window_kv.stride(-1) == 1 else window_kv.contiguous()
    comp_slots = comp_slots if comp_slots.stride(-1) == 1 else comp_slots.contiguous()
    sinks = sinks.float().contiguous()
    acc = torch.empty(batch, splits, heads, dim, dtype=torch.float32, device=q.device)
    split_max = torch.empty(batch, splits, heads, dtype=torch.float32, device=q.device)
    split_sum = torch.empty_like(split_max)
    _split_kernel[(batch, splits, head_blocks)](
        q.contiguous(),
        window_kv,
        window_bias.float().contiguous(),
        comp_slots,
        comp_idx.contiguous(),
        sinks,
        acc,
        split_max,
        split_sum,
        heads,
        dim,
        window,
        picks,
        splits,
        split_len,
        float(scale) * math.log2(math.e),
        window_kv.stride(0),
        window_kv.stride(1),
        comp_slots.stride(0),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 stays fp32; 16-bit ignores it
        BLOCK_H=_BLOCK_H,
        BLOCK_N=_BLOCK_N,
        BLOCK_D=block_size(dim),
        num_warps=4,
    )
    out = torch.empty_like(q)
    block_d = min(block_size(dim), _COMBINE_BLOCK_D)
    _combine_kernel[(batch, triton.cdiv(heads, _COMBINE_BLOCK_H), triton.cdiv(dim, block_d))](
        acc,
        split_max,
        split_sum,
        sinks,
        out,
        heads,
        dim,
        splits,
        BLOCK_H=_COMBINE_BLOCK_H,
        BLOCK_D=block_d,
        num_warps=4,
    )
    return out


def sparse_decode_attention_reference(
    q: torch.Tensor,
    window_kv: torch.Tensor,
    window_bias: torch.Tensor,
    comp_slots: torch.Tensor,
    comp_idx: torch.Tensor,
    sinks: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The spec of `sparse_decode_attention` in plain torch, fp32 throughout."""
    batch, heads, _ = q.shape
    comp = comp_slots[comp_idx.clamp(min=0)].float()  # (B, K, D)
    comp_bias = torch.zeros(comp_idx.shape, device=q.device).masked_fill(comp_idx < 0, float("-inf"))
    values = torch.cat([window_kv.float(), comp], dim=1)  # (B, W + K, D)
    bias = torch.cat([window_bias.float(), comp_bias], dim=1)  # (B, W + K)
    logits = torch.einsum("bhd,bnd->bhn", q.float(), values) * scale + bias[:, None, :]  # (B, H, W + K)
    sink = sinks.float().view(1, heads, 1).expand(batch, heads, 1)
    probs = torch.cat([logits, sink], dim=-1).softmax(dim=-1)[..., :-1]  # the sink's mass is dropped
    return torch.einsum("bhn,bnd->bhd", probs, values).to(q.dtype)


def sparse_decode_attention(
    q: torch.Tensor,
    window_kv: torch.Tensor,
    window_bias: torch.Tensor,
    comp_slots: torch.Tensor,
    comp_idx: torch.Tensor,
    sinks: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention output (B, H, D) in q.dtype of one decode query over window + picked chunks + sink.

    The Triton kernel runs on CUDA tensors, the reference otherwise.
    """
    if runs_triton(q):
        return sparse_decode_attention_triton(q, window_kv, window_bias, comp_slots, comp_idx, sinks, scale)
    return sparse_decode_attention_reference(q, window_kv, window_bias, comp_slots, comp_idx, sinks, scale)
