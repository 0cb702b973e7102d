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

`sparse_attention_triton` is the one launcher of both kernels, shared with prefill (`sparse_prefill_attention`,
where a row is a token of the chunk instead of a sequence). Its compressed entries come either from picked slots
(`comp_idx`, CSA) or from a per-row prefix of the table (`comp_limit`: entry j is comp row j, visible iff
j < comp_limit[row], HCA), chosen by a constexpr so that each mode compiles to its own kernel.
"""

import math

import torch

from ._backend import block_size, require_triton, runs_triton, tl, triton


@triton.jit
def _split_kernel(
    q_ptr,  # (B, H, D) contiguous
    win_ptr,  # (B, W, D), any row strides (a band view), unit column stride
    bias_ptr,  # (B, W) fp32 contiguous
    comp_ptr,  # (N, D), any row stride, unit column stride
    idx_ptr,  # (B, K) contiguous; unused when PREFIX
    limit_ptr,  # (B,) per-row prefix length of comp; unused unless PREFIX
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
    PREFIX: tl.constexpr,
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
    if PREFIX:  # the row sees comp rows [0, limit): its split stops there (a negative limit counts as 0)
        end = tl.minimum(end, W + tl.maximum(tl.minimum(tl.load(limit_ptr + b), K), 0))
    for n0 in range(start, end, BLOCK_N):
        j = n0 + tl.arange(0, BLOCK_N)  # entry index: window rows first, then chunks
        in_split = j < end
        is_win = j < W
        if PREFIX:
            slot = tl.where((j >= W) & in_split, j - W, -1).to(tl.int64)
        else:
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


def plan_splits(rows: int, heads: int, entries: int, max_splits: int | None = None) -> tuple[int, int]:
    """(splits, split_len): how the entries [window, comp] of every row are cut for the split kernel.

    As many splits as fill the GPU together with the rows and head blocks, each a whole number of BLOCK_N
    entries, and at most `max_splits` (a bound on the fp32 split accumulators). At least one, so that a row
    with no entries at all still gets its (zero) output from the sink alone. Many rows (a prefill) get one.
    """
    entries = max(entries, 1)
    entry_blocks = triton.cdiv(entries, _BLOCK_N)
    splits = max(1, min(entry_blocks, _TARGET_PROGRAMS // max(rows * triton.cdiv(heads, _BLOCK_H), 1)))
    if max_splits is not None:
        splits = max(1, min(splits, max_splits))
    split_len = triton.cdiv(entry_blocks, splits) * _BLOCK_N
    return triton.cdiv(entries, split_len), split_len


def _launch_split(q, window_kv, window_bias, comp, comp_idx, comp_limit, comp_len, sinks, scale, splits, split_len):
    """Run the split kernel; returns its partial states (acc (B, S, H, D), max (B, S, H), sum (B, S, H))."""
    batch, heads, dim = q.shape
    acc = torch.empty(batch, splits, heads, dim, dtype=torch.float32, device=q.device)
    split_max = torch.empty(batch, splits, heads, dtype=torch.float32, device=q.device)
    split_sum = torch.empty_like(split_max)
    prefix = comp_limit is not None
    idx = comp_limit if prefix else comp_idx.contiguous()  # the unused pointer of a mode is any tensor
    _split_kernel[(batch, splits, triton.cdiv(heads, _BLOCK_H))](
        q.contiguous(),
        window_kv,
        window_bias.float().contiguous(),
        comp,
        idx,
        comp_limit.contiguous() if prefix else idx,
        sinks,
        acc,
        split_max,
        split_sum,
        heads,
        dim,
        window_kv.shape[1],
        comp_len,
        splits,
        split_len,
        float(scale) * math.log2(math.e),
        window_kv.stride(0),
        window_kv.stride(1),
        comp.stride(0),
        PREFIX=prefix,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 stays fp32; 16-bit ignores it
        BLOCK_H=_BLOCK_H,
        BLOCK_N=_BLOCK_N,
        BLOCK_D=block_size(dim),
        num_warps=4,
    )
    return acc, split_max, split_sum


def _launch_combine(acc, split_max, split_sum, sinks, out):
    """Merge the splits' partial states with the sink into `out` (B, H, D), contiguous."""
    batch, splits, heads, dim = acc.shape
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


def sparse_attention_triton(
    q: torch.Tensor,
    window_kv: torch.Tensor,
    window_bias: torch.Tensor,
    comp: torch.Tensor,
    sinks: torch.Tensor,
    scale: float,
    comp_idx: torch.Tensor | None = None,
    comp_limit: torch.Tensor | None = None,
    comp_len: int | None = None,
    max_splits: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One launch of the split and combine kernels over the rows of q; returns `out` (B, H, D) in q.dtype.

    Exactly one of comp_idx (B, K) picked slots, -1 = skip, and comp_limit (B,) prefix lengths is given. In
    prefix mode K is `comp_len`, a bound on comp_limit that defaults to the table's length (no host sync); a
    tighter bound only makes the split plan better, rows never read past their own limit. `window_kv` is read
    through its strides (a band view is fine); `out`, if given, must be contiguous.
    """
    if (comp_idx is None) == (comp_limit is None):
        raise ValueError("pass exactly one of comp_idx (picked slots) and comp_limit (per-row prefix lengths)")
    if not q.dtype == window_kv.dtype == comp.dtype:
        raise ValueError(
            f"q, window_kv and the comp table must share one dtype (the kernel feeds them to one dot), got "
            f"{q.dtype}, {window_kv.dtype}, {comp.dtype}: cast q to the cache dtype"
        )
    if comp_idx is not None:
        comp_len = comp_idx.shape[1]
    elif comp_len is None:
        comp_len = comp.shape[0]
    batch, heads, dim = q.shape
    splits, split_len = plan_splits(batch, heads, window_kv.shape[1] + comp_len, max_splits)
    window_kv = window_kv if window_kv.stride(-1) == 1 else window_kv.contiguous()
    comp = comp if comp.stride(-1) == 1 else comp.contiguous()
    sinks = sinks.float().contiguous()
    states = _launch_split(
        q, window_kv, window_bias, comp, comp_idx, comp_limit, comp_len, sinks, scale, splits, split_len
    )
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
    _launch_combine(*states, sinks, out)
    return out


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
    return sparse_attention_triton(q, window_kv, window_bias, comp_slots, sinks, scale, comp_idx=comp_idx)


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
