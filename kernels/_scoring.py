"""The indexer score term shared by every scoring kernel: relu(q . k) * softmax_scale * weight, one tile at a time.

Level 1 (memory indexer), level 2 (native indexer over resident candidates) and the streamed native-indexer
top-k all score `sum_h weight[h] * relu(q[h] . k) * softmax_scale` and differ only in which rows they pair
and how they sum: level 1 and 2 pair the H heads of one query with a tile of keys and sum the tile's rows;
the streamed top-k pairs a tile of queries (one head at a time) with a tile of keys and adds the tiles over
heads. Keeping the term in one helper keeps the three in the stock scorer's order of operations (relu, then
the scale, then the weight), so their scores agree with the stock model's to fp32 summation noise.
"""

from ._backend import tl, triton


@triton.jit
def relu_weighted_dots(
    q_rows,  # (BLOCK_R,) pointers to the first element of each query row; q rows are contiguous along d
    q_valid,  # (BLOCK_R,) bool
    weights,  # (BLOCK_R,) fp32, the weight of each query row (0 where not valid)
    key_rows,  # (BLOCK_C,) pointers to the first element of each key row
    key_valid,  # (BLOCK_C,) bool
    stride_kd,
    DK,
    softmax_scale,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """(BLOCK_R, BLOCK_C) fp32: relu(q_r . k_c) * softmax_scale * weights[r]; 0 where q_r is not valid.

    The dot runs over Dk in BLOCK_D slices so that register use stays bounded for any head size. UPCAST
    converts both operands to fp32 first (needed when q and keys differ in dtype); PRECISION is the
    `tl.dot` input precision of fp32 operands ("ieee", "tf32x3", "tf32").
    """
    dots = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for d0 in range(0, DK, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        q = tl.load(q_rows[:, None] + d[None, :], mask=q_valid[:, None] & (d[None, :] < DK), other=0.0)
        keys = tl.load(
            key_rows[None, :] + d[:, None] * stride_kd,
            mask=key_valid[None, :] & (d[:, None] < DK),
            other=0.0,
        )  # (BLOCK_D, BLOCK_C)
        if UPCAST:
            dots += tl.dot(q.to(tl.float32), keys.to(tl.float32), input_precision=PRECISION)
        else:
            dots += tl.dot(q, keys, input_precision=PRECISION)
    return tl.maximum(dots, 0.0) * softmax_scale * weights[:, None]
