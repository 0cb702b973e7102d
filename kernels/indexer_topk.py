"""Native Lightning-Indexer top-k over a long history, streamed: never an (N, T) or (N, H, T) score tensor.

In long prefill of a CSA layer every query of the chunk (up to ~4096 x batch) picks the top-k compressed
entries of the history (up to 256K at 1M context) by the stock DeepSeek-V4 indexer score
(`DeepseekV4IndexerScorer` + the top-k of `DeepseekV4Indexer.forward`):

    score[n, t] = sum_h weights[n, h] * (relu(q[n, h] . keys[t]) * softmax_scale)      (fp32)

Query n sees keys [0, limit[n]) only. The stock scorer materializes (B, S, H, T) fp32, about 256 GiB for
4096 queries x 64 heads x 256K keys; here keys are scored in blocks of `key_block` rows (and queries in
blocks of `query_block`) so that one (query_block, key_block) fp32 buffer holds the scores, and each block is
merged into a running top-k with `torch.topk` over [running (Nq, kk) | block (Nq, key_block)].

Results match the stock selection: per row the top kk = min(k, T) visible keys, scores descending, and where
fewer than kk keys are visible the remaining slots hold index -1 and score -inf. Among exactly equal scores
the pick may differ from an unblocked `torch.topk` (which breaks ties in an unspecified order too): the
merge sees a block's entries after the running ones. Scores agree with the stock ones to fp32 summation
noise (bf16 inputs: the products are exact in fp32, only the order of the sums differs).
"""

import torch

from ._backend import block_size, require_triton, runs_triton, tl, triton
from ._scoring import relu_weighted_dots

DEFAULT_MAX_BUFFER_BYTES = 256 * 2**20
# The torch reference multiplies every head at once, (query_block, H, key_block) fp32: a small tile keeps a CPU
# prefill's temporaries the same size whatever the history (the GPU buffer is (query_block, key_block) only).
REFERENCE_TILE_BYTES = 8 * 2**20
_BLOCK_M = 64  # queries per Triton program
_BLOCK_N = 64  # keys per Triton program


@triton.jit
def _indexer_scores_kernel(
    q_ptr,  # (M, H, DK) contiguous
    w_ptr,  # (M, H) fp32 contiguous
    keys_ptr,  # (TK, DK) rows strided, stride(1) == 1
    limit_ptr,  # (M,) int64
    out_ptr,  # (M, TK) fp32, row stride stride_om
    M,
    TK,
    key_start,
    H,
    DK,
    softmax_scale,
    stride_kt,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    t = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_m = m < M
    in_t = t < TK
    rows = m.to(tl.int64) * H  # first (query, head) row of each query
    key_rows = keys_ptr + t.to(tl.int64) * stride_kt
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for h in range(H):
        w = tl.load(w_ptr + rows + h, mask=in_m, other=0.0)
        acc += relu_weighted_dots(
            q_ptr + (rows + h) * DK,
            in_m,
            w,
            key_rows,
            in_t,
            1,
            DK,
            softmax_scale,
            BLOCK_M,
            BLOCK_N,
            BLOCK_D,
            UPCAST,
            PRECISION,
        )
    limit = tl.load(limit_ptr + m, mask=in_m, other=0)
    visible = (key_start + t)[None, :] < limit[:, None]
    out = out_ptr + m.to(tl.int64)[:, None] * stride_om + t[None, :]
    tl.store(out, tl.where(visible, acc, float("-inf")), mask=in_m[:, None] & in_t[None, :])


def stream_blocks(
    n_queries: int, n_keys: int, k: int, bytes_per_pair: int, max_buffer_bytes: int
) -> tuple[int, int]:
    """(query_block, key_block) so that query_block x key_block x bytes_per_pair <= max_buffer_bytes.

    key_block is a power of two between min(k, n_keys) and n_keys, both rounded up: a block can fill the
    whole top-k, and a short history is one block. Keys are blocked before queries: all queries share one
    pass over the keys while that fits, otherwise queries are blocked too. Only when one query row of the
    smallest key block already exceeds the budget does the buffer go over it (query_block = 1).
    """
    pairs = max(1, max_buffer_bytes // bytes_per_pair)
    smallest = block_size(min(k, n_keys), minimum=1)
    largest = block_size(n_keys, minimum=1)
    fit = 1 << (max(pairs // max(n_queries, 1), 1).bit_length() - 1)  # largest power of two <= pairs / N
    key_block = min(max(fit, smallest), largest)
    return max(1, min(n_queries, pairs // key_block)), key_block


def _check_inputs(q, weights, keys, limit, k) -> None:
    """Raise at the boundary with what was wrong, before any kernel or matmul sees the tensors."""
    if q.dim() != 3 or not q.is_floating_point():
        raise ValueError(f"q must be a float tensor (queries, heads, head_dim), got {q.dtype} {tuple(q.shape)}")
    n, heads, dk = q.shape
    if weights.shape != (n, heads) or weights.dtype != torch.float32:
        raise ValueError(
            f"weights must be float32 of shape {(n, heads)} (queries, heads), got {weights.dtype} "
            f"{tuple(weights.shape)}: multiply the stock weights_scaling in fp32"
        )
    if keys.dim() != 2 or keys.shape[1] != dk or keys.dtype != q.dtype:
        raise ValueError(
            f"keys must be {q.dtype} of shape (history, {dk}) like q, got {keys.dtype} {tuple(keys.shape)}"
        )
    if keys.shape[0] > 0 and keys.stride(1) != 1:
        raise ValueError(
            f"keys rows must be contiguous (stride(1) == 1), got strides {keys.stride()}: pass .contiguous()"
        )
    if limit.shape != (n,) or limit.is_floating_point() or limit.dtype == torch.bool:
        raise ValueError(f"limit must be an integer tensor of shape ({n},), got {limit.dtype} {tuple(limit.shape)}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if len({q.device, weights.device, keys.device, limit.device}) != 1:
        raise ValueError("q, weights, keys and limit must be on one device")


def _merge(
    run_scores: torch.Tensor, run_idx: torch.Tensor, block: torch.Tensor, key_start: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Running top-kk (Nq, kk) merged with one block of scores (Nq, Tk) whose first key is key_start."""
    kk = run_scores.shape[1]
    top_scores, pos = torch.cat([run_scores, block], dim=1).topk(kk, dim=1)  # (Nq, kk)
    kept = run_idx.gather(1, pos.clamp(max=kk - 1))
    return top_scores, torch.where(pos >= kk, pos - kk + key_start, kept)


def _streamed_topk(block_scores, limit, n_keys, k, query_block, key_block):
    """Top-kk of every row over key blocks; block_scores(n0, n1, t0, t1) gives the (n1-n0, t1-t0) fp32 scores
    of queries [n0, n1) against keys [t0, t1), -inf where a key is not visible."""
    n, kk = limit.shape[0], min(k, n_keys)
    scores = torch.full((n, kk), float("-inf"), dtype=torch.float32, device=limit.device)
    indices = torch.full((n, kk), -1, dtype=torch.int64, device=limit.device)
    if kk == 0:
        return indices, scores
    for n0 in range(0, n, query_block):
        n1 = min(n, n0 + query_block)
        run_scores, run_idx = scores[n0:n1], indices[n0:n1]
        for t0 in range(0, n_keys, key_block):
            block = block_scores(n0, n1, t0, min(n_keys, t0 + key_block))
            run_scores, run_idx = _merge(run_scores, run_idx, block, t0)
        scores[n0:n1], indices[n0:n1] = run_scores, run_idx
    return indices.masked_fill_(scores == float("-inf"), -1), scores


def indexer_topk_reference(
    q: torch.Tensor,
    weights: torch.Tensor,
    keys: torch.Tensor,
    limit: torch.Tensor,
    k: int,
    softmax_scale: float,
    max_buffer_bytes: int = REFERENCE_TILE_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`indexer_topk` in plain torch, streamed the same way; what runs on CPU in production.

    Its largest temporary is the (query_block, H, key_block) fp32 product of one block (one GEMM), kept
    under max_buffer_bytes; relu, scale and weight are applied in place, in the stock order.
    """
    _check_inputs(q, weights, keys, limit, k)
    n, heads, _ = q.shape
    query_block, key_block = stream_blocks(n, keys.shape[0], k, 4 * heads, max_buffer_bytes)

    def block_scores(n0, n1, t0, t1):
        dots = torch.matmul(q[n0:n1].float(), keys[t0:t1].float().T)  # (Nq, H, Tk)
        dots.relu_().mul_(softmax_scale).mul_(weights[n0:n1, :, None])
        position = torch.arange(t0, t1, device=keys.device)
        return dots.sum(dim=1).masked_fill_(position[None, :] >= limit[n0:n1, None], float("-inf"))

    return _streamed_topk(block_scores, limit, keys.shape[0], k, query_block, key_block)


def indexer_topk_triton(
    q: torch.Tensor,
    weights: torch.Tensor,
    keys: torch.Tensor,
    limit: torch.Tensor,
    k: int,
    softmax_scale: float,
    max_buffer_bytes: int = DEFAULT_MAX_BUFFER_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`indexer_topk` with each block's scores from the fused Triton kernel (one (query_block, key_block) fp32
    buffer, reused) and the merge from torch.topk; runs under TRITON_INTERPRET on CPU tensors too.

    fp32 inputs use IEEE fp32 dots; bf16/fp16 inputs use the tensor cores with fp32 accumulation.
    """
    require_triton("indexer_topk")
    _check_inputs(q, weights, keys, limit, k)
    q, weights, limit = q.contiguous(), weights.contiguous(), limit.to(torch.int64).contiguous()
    n, heads, dk = q.shape
    query_block, key_block = stream_blocks(n, keys.shape[0], k, 4, max_buffer_bytes)
    buffer = torch.empty(min(n, query_block), key_block, dtype=torch.float32, device=q.device)
    # The interpreter (CPU tensors) multiplies bf16/fp16 tiles as their raw integer bits (its create_dot
    # matmuls the uint16 storage), so there the operands go to fp32 first; fp32 holds their products exactly.
    upcast = not q.is_cuda
    wide = q.dtype == torch.float32 or upcast

    def block_scores(n0, n1, t0, t1):
        out = buffer[: n1 - n0, : t1 - t0]
        grid = (triton.cdiv(n1 - n0, _BLOCK_M), triton.cdiv(t1 - t0, _BLOCK_N))
        _indexer_scores_kernel[grid](
            q[n0:n1], weights[n0:n1], keys[t0:t1], limit[n0:n1], out,
            n1 - n0, t1 - t0, t0, heads, dk, float(softmax_scale), keys.stride(0), buffer.stride(0),
            BLOCK_M=_BLOCK_M,
            BLOCK_N=_BLOCK_N,
            BLOCK_D=min(block_size(dk), 64 if wide else 128),
            UPCAST=upcast,
            PRECISION="ieee" if wide else "tf32",
            num_warps=4,
        )
        return out

    return _streamed_topk(block_scores, limit, keys.shape[0], k, query_block, key_block)


def indexer_topk(
    q: torch.Tensor,
    weights: torch.Tensor,
    keys: torch.Tensor,
    limit: torch.Tensor,
    k: int,
    softmax_scale: float,
    max_buffer_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k history entries per query by native indexer score: (indices (N, kk) int64, scores (N, kk) fp32).

    q: (N, H, D) float; weights: (N, H) fp32, already times the stock weights_scaling; keys: (T, D) like q,
    rows may be strided (stride(1) == 1); limit: (N,) int, query n sees keys [0, limit[n]). kk = min(k, T).
    Scores descend; slots past the visible keys hold -1 / -inf. The score buffer stays under
    max_buffer_bytes (see `stream_blocks`; None: DEFAULT_MAX_BUFFER_BYTES for the Triton kernel's
    (queries, keys) buffer, REFERENCE_TILE_BYTES for the reference's (queries, heads, keys) tile). The Triton
    kernel runs on CUDA tensors, the reference otherwise.
    """
    if runs_triton(keys):
        return indexer_topk_triton(q, weights, keys, limit, k, softmax_scale, max_buffer_bytes or DEFAULT_MAX_BUFFER_BYTES)
    return indexer_topk_reference(q, weights, keys, limit, k, softmax_scale, max_buffer_bytes or REFERENCE_TILE_BYTES)
