"""Sparse attention of a long prefill chunk of a DeepSeek-V4 layer, with temporaries bounded whatever its length.

In prefill every token n of the chunk is one query row. Like a decode query it attends its sliding window of W
K=V rows, some compressed entries and the per-head sink, so the Triton path is the decode kernel launched over
blocks of rows (`sparse_attention_triton`); only the compressed entries differ between the two layer kinds:

    CSA layers: comp_idx (N, K), the indexer's own top-k picks per token, -1 = skip;
    HCA layers: comp_limit (N,), every compressed row made before the token, rows [0, comp_limit[n]).

    q (N, H, D); window_kv (N, W, D) where row n's window is token rows n..n+W-1 of a (N + W - 1, D) token KV
    (`window_band` makes that view without copying, and both paths read it through its strides);
    window_bias (N, W) fp32 additive (0 / -inf: causality, window, left padding); comp (M, D) with unit
    column stride; sinks (H,); out (N, H, D) in q.dtype, fp32 math.

Memory stays bounded: the Triton launcher keeps its fp32 split accumulators (rows, splits, H, D) under a byte
budget by cutting the rows into blocks; the reference (which runs the CPU prefill) walks blocks of rows and
blocks of keys with an online softmax, so it never holds a (rows, M) logit matrix nor a float copy of the table.
"""

import torch

from ._backend import require_triton, runs_triton
from .sparse_decode_attention import sparse_attention_triton

SPLIT_BUDGET_BYTES = 256 << 20  # fp32 split accumulators of one launch; 2048 rows at H=64, D=512
REFERENCE_ROW_BLOCK = 64
REFERENCE_KEY_BLOCK = 512


def window_band(kv: torch.Tensor, window: int) -> torch.Tensor:
    """Zero-copy (..., N, W, D) view of a token KV (..., L, D), L = N + W - 1: row n is token rows n..n+W-1.

    The last entry of row n is token n + W - 1 itself, so a chunk of N tokens preceded by its W - 1 cached
    predecessors gives each token its causal window.
    """
    length, dim = kv.shape[-2:]
    if window < 1 or length < window - 1:
        raise ValueError(f"a band of window {window} needs at least window - 1 = {window - 1} token rows, got {length}")
    *lead, step, col = kv.stride()
    size = (*kv.shape[:-2], length - window + 1, window, dim)
    return kv.as_strided(size, (*lead, step, step, col), kv.storage_offset())


def band_bias(valid: torch.Tensor, window: int) -> torch.Tensor:
    """(..., N, W) fp32 additive bias of the band view: 0 where the token row is valid, -inf where it is not
    (left padding, rows before the sequence start). `valid` (..., L) bool, one flag per token row."""
    band = window_band(valid.unsqueeze(-1), window).squeeze(-1)  # (..., N, W) view
    return torch.zeros(band.shape, device=valid.device).masked_fill(~band, float("-inf"))


def _check_inputs(q, window_kv, window_bias, comp, sinks, comp_idx, comp_limit) -> None:
    """Raise a ValueError naming the first argument that breaks the contract of `sparse_prefill_attention`."""
    if (comp_idx is None) == (comp_limit is None):
        raise ValueError("pass exactly one of comp_idx (CSA: picked rows per token) and comp_limit (HCA: prefix)")
    if q.dim() != 3:
        raise ValueError(f"q must be (N, H, D), got shape {tuple(q.shape)}")
    rows, heads, dim = q.shape
    if window_kv.dim() != 3 or window_kv.shape[0] != rows or window_kv.shape[2] != dim:
        raise ValueError(f"window_kv must be (N={rows}, W, D={dim}), got {tuple(window_kv.shape)}: see window_band")
    if window_bias.shape != window_kv.shape[:2] or window_bias.dtype != torch.float32:
        raise ValueError(
            f"window_bias must be fp32 {tuple(window_kv.shape[:2])}, got {window_bias.dtype} {tuple(window_bias.shape)}"
        )
    if comp.dim() != 2 or comp.shape[1] != dim:
        raise ValueError(f"comp must be (M, D={dim}), got {tuple(comp.shape)}")
    if window_kv.stride(-1) != 1 or comp.stride(-1) != 1:
        raise ValueError("window_kv and comp must have unit stride along D (they are read in place, never copied)")
    if not q.dtype == window_kv.dtype == comp.dtype:
        raise ValueError(
            f"q, window_kv and comp must share one dtype, got {q.dtype}, {window_kv.dtype}, {comp.dtype}: "
            "cast q to the cache dtype"
        )
    if sinks.shape != (heads,):
        raise ValueError(f"sinks must be (H={heads},), got {tuple(sinks.shape)}")
    if comp_idx is not None and (comp_idx.dim() != 2 or comp_idx.shape[0] != rows or comp_idx.dtype != torch.int64):
        raise ValueError(f"comp_idx must be int64 (N={rows}, K), got {comp_idx.dtype} {tuple(comp_idx.shape)}")
    if comp_limit is not None and (comp_limit.shape != (rows,) or comp_limit.dtype != torch.int64):
        raise ValueError(f"comp_limit must be int64 (N={rows},), got {comp_limit.dtype} {tuple(comp_limit.shape)}")


def sparse_prefill_attention_triton(
    q: torch.Tensor,
    window_kv: torch.Tensor,
    window_bias: torch.Tensor,
    comp: torch.Tensor,
    sinks: torch.Tensor,
    scale: float,
    comp_idx: torch.Tensor | None = None,
    comp_limit: torch.Tensor | None = None,
    comp_len: int | None = None,
    budget_bytes: int = SPLIT_BUDGET_BYTES,
) -> torch.Tensor:
    """Triton launcher of `sparse_prefill_attention`; runs under TRITON_INTERPRET on CPU tensors too.

    Rows go in blocks whose fp32 split accumulators (rows, splits, H, D) fit `budget_bytes`: a long chunk
    runs one split per row (its rows already fill the GPU), a short one as many splits as the budget and the
    GPU take. `comp_len` bounds comp_limit (default: the table's length, which needs no host sync).
    """
    require_triton("sparse_prefill_attention")
    _check_inputs(q, window_kv, window_bias, comp, sinks, comp_idx, comp_limit)
    if comp_len is not None and not 0 <= comp_len <= comp.shape[0]:
        raise ValueError(f"comp_len must bound comp_limit inside the table (0..{comp.shape[0]}), got {comp_len}")
    rows, heads, dim = q.shape
    row_bytes = heads * dim * 4  # one split of one row
    block = max(1, budget_bytes // row_bytes)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    for start in range(0, rows, block):
        r = slice(start, start + block)
        sparse_attention_triton(
            q[r],
            window_kv[r],
            window_bias[r],
            comp,
            sinks,
            scale,
            comp_idx=None if comp_idx is None else comp_idx[r],
            comp_limit=None if comp_limit is None else comp_limit[r],
            comp_len=comp_len,
            max_splits=max(1, budget_bytes // (row_bytes * min(block, rows - start))),
            out=out[r],
        )
    return out


def _fold(state, q, keys, bias):
    """Fold one block of keys into the online-softmax state (max, sum, acc) of a block of rows.

    q (R, H, D) fp32, already scaled; keys (R, n, D) per row or (n, D) shared by all rows; bias (R, n) fp32.
    The state starts at the sink (max = sink, sum = 1, acc = 0), so fully masked blocks change nothing.
    """
    if keys.shape[-2] == 0:
        return state
    row_max, row_sum, acc = state
    keys = keys.float()
    pattern = "rhd,nd->rhn" if keys.dim() == 2 else "rhd,rnd->rhn"
    logits = torch.einsum(pattern, q, keys) + bias[:, None, :]  # (R, H, n)
    new_max = torch.maximum(row_max, logits.amax(dim=-1))
    alpha = torch.exp(row_max - new_max)
    probs = torch.exp(logits - new_max[..., None])
    pattern = "rhn,nd->rhd" if keys.dim() == 2 else "rhn,rnd->rhd"
    acc = acc * alpha[..., None] + torch.einsum(pattern, probs, keys)
    return new_max, row_sum * alpha + probs.sum(dim=-1), acc


def _comp_blocks(comp, comp_idx, comp_limit, rows: slice, key_block: int):
    """Yield (keys, bias) blocks of the compressed entries of a block of rows: gathered picks (R, n, D) in CSA
    mode, shared table rows (n, D) in HCA mode, never more than `key_block` entries at a time."""
    if comp_idx is not None:
        idx = comp_idx[rows]
        for k0 in range(0, idx.shape[1], key_block):
            picks = idx[:, k0 : k0 + key_block]
            yield comp[picks.clamp(min=0)], torch.zeros(picks.shape, device=comp.device).masked_fill(
                picks < 0, float("-inf")
            )
        return
    limit = comp_limit[rows].clamp(0, comp.shape[0])
    for k0 in range(0, int(limit.max()) if limit.numel() else 0, key_block):
        entry = torch.arange(k0, min(k0 + key_block, comp.shape[0]), device=comp.device)
        bias = torch.zeros(limit.shape[0], entry.shape[0], device=comp.device)
        yield comp[k0 : k0 + key_block], bias.masked_fill(entry[None, :] >= limit[:, None], float("-inf"))


def sparse_prefill_attention_reference(
    q: torch.Tensor,
    window_kv: torch.Tensor,
    window_bias: torch.Tensor,
    comp: torch.Tensor,
    sinks: torch.Tensor,
    scale: float,
    comp_idx: torch.Tensor | None = None,
    comp_limit: torch.Tensor | None = None,
    row_block: int = REFERENCE_ROW_BLOCK,
    key_block: int = REFERENCE_KEY_BLOCK,
) -> torch.Tensor:
    """The spec of `sparse_prefill_attention` in plain torch, fp32 math, in blocks of rows and keys.

    Its largest temporaries are (row_block, H, key_block) logits and, in CSA mode, (row_block, key_block, D)
    gathered picks: they do not grow with N nor with the table length M.
    """
    _check_inputs(q, window_kv, window_bias, comp, sinks, comp_idx, comp_limit)
    rows, heads, dim = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    sink = sinks.float()
    for start in range(0, rows, row_block):
        r = slice(start, start + row_block)
        q_block = q[r].float() * scale  # (R, H, D)
        n = q_block.shape[0]
        state = (sink.expand(n, heads).clone(), q_block.new_ones(n, heads), q_block.new_zeros(n, heads, dim))
        state = _fold(state, q_block, window_kv[r], window_bias[r])
        for keys, bias in _comp_blocks(comp, comp_idx, comp_limit, r, key_block):
            state = _fold(state, q_block, keys, bias)
        _, row_sum, acc = state
        out[r] = (acc / row_sum[..., None]).to(q.dtype)
    return out


def sparse_prefill_attention(
    q: torch.Tensor,
    window_kv: torch.Tensor,
    window_bias: torch.Tensor,
    comp: torch.Tensor,
    sinks: torch.Tensor,
    scale: float,
    comp_idx: torch.Tensor | None = None,
    comp_limit: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention output (N, H, D) in q.dtype of N prefill tokens over window + compressed entries + sink.

    Exactly one of comp_idx (CSA picks) and comp_limit (HCA prefix lengths). The Triton kernel runs on CUDA
    tensors, the reference otherwise.
    """
    if runs_triton(q):
        return sparse_prefill_attention_triton(q, window_kv, window_bias, comp, sinks, scale, comp_idx, comp_limit)
    return sparse_prefill_attention_reference(q, window_kv, window_bias, comp, sinks, scale, comp_idx, comp_limit)
