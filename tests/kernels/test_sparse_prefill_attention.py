"""Sparse prefill attention, reference and Triton launcher, against a naive dense oracle written here.

Inputs are the shapes prefill really passes: the window is a band view of one token KV tensor, the table has a
row stride, biases mask whole windows, picks are padded with -1 (or absent), prefix limits are 0, partial, full.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fm_transformers.kernels import HAS_TRITON
from fm_transformers.kernels.sparse_decode_attention import plan_splits
from fm_transformers.kernels.sparse_prefill_attention import (
    band_bias,
    sparse_prefill_attention,
    sparse_prefill_attention_reference,
    sparse_prefill_attention_triton,
    window_band,
)
from tests.conftest import LargestTensor

FP32_TOL = dict(rtol=1e-4, atol=1e-4)
HALF_TOL = dict(rtol=2e-2, atol=2e-2)  # 16-bit inputs and output; the value dot takes 16-bit probabilities

# The Triton interpreter cannot compute in bfloat16 (see test_sparse_decode_attention.py): on CPU the kernel's
# 16-bit path is checked in float16, bfloat16 needs a GPU. The torch reference runs bfloat16 anywhere.
KERNEL_HALF_DTYPES = [
    torch.float16,
    pytest.param(
        torch.bfloat16,
        marks=pytest.mark.gpu,
    ),
]
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

ROWS, HEADS, DIM, WINDOW, TABLE = 37, 6, 40, 5, 23


def dense_oracle(q, window_kv, window_bias, comp, sinks, scale, comp_idx=None, comp_limit=None):
    """Full fp32 logits over [window, compressed entries, sink], one softmax, the sink's column dropped."""
    rows, heads, _ = q.shape
    comp = comp.float()
    if comp_idx is not None:
        keys = comp[comp_idx.clamp(min=0)]  # (N, K, D)
        comp_bias = torch.where(comp_idx >= 0, 0.0, float("-inf"))
    else:
        keys = comp.expand(rows, *comp.shape)  # (N, M, D)
        comp_bias = torch.where(torch.arange(comp.shape[0], device=comp.device)[None, :] < comp_limit[:, None], 0.0, float("-inf"))
    values = torch.cat([window_kv.float(), keys], dim=1)
    bias = torch.cat([window_bias, comp_bias.to(window_bias.device)], dim=1)
    logits = torch.einsum("nhd,nkd->nhk", q.float(), values) * scale + bias[:, None, :]
    logits = torch.cat([logits, sinks.float().view(1, heads, 1).expand(rows, heads, 1)], dim=-1)
    return torch.einsum("nhk,nkd->nhd", logits.softmax(dim=-1)[..., :-1], values)


def make_inputs(gen, device, dtype, mode, picks=9, rows=ROWS, table=TABLE):
    """Prefill inputs; mode "picked" or "prefix". Token rows 0-2 are left padding, so early windows are partly
    masked, and rows 4 and 20 have their whole window masked; in picked mode row 4 also has no picks."""
    kv = torch.randn(rows + WINDOW - 1, DIM, generator=gen).to(dtype)
    valid = torch.ones(rows + WINDOW - 1, dtype=torch.bool)
    valid[:3] = False
    bias = band_bias(valid, WINDOW)
    bias[[4, 20]] = float("-inf")
    comp = torch.randn(table, DIM + 7, generator=gen).to(dtype)[:, :DIM]  # a row stride of DIM + 7
    inputs = dict(
        q=torch.randn(rows, HEADS, DIM, generator=gen).to(dtype),
        window_kv=window_band(kv, WINDOW),
        window_bias=bias,
        comp=comp,
        sinks=torch.randn(HEADS, generator=gen),
        scale=DIM**-0.5,
    )
    if mode == "picked":
        idx = torch.randint(0, table, (rows, picks), generator=gen)
        idx[torch.rand(rows, picks, generator=gen) < 0.3] = -1
        idx[4] = -1
        inputs["comp_idx"] = idx
    else:
        limit = torch.randint(0, table + 1, (rows,), generator=gen)
        limit[[0, 4, 7]] = 0
        limit[[1, 20, rows - 1]] = table
        inputs["comp_limit"] = limit
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def check(op, inputs, dtype, **kwargs):
    got = op(**inputs, **kwargs)
    assert got.dtype == dtype and got.shape == (ROWS, HEADS, DIM)
    want = dense_oracle(**inputs)
    torch.testing.assert_close(got.float(), want, **(FP32_TOL if dtype == torch.float32 else HALF_TOL))


def test_window_band_is_a_zero_copy_view_of_the_token_rows(gen):
    kv = torch.randn(ROWS + WINDOW - 1, DIM, generator=gen)
    band = window_band(kv, WINDOW)
    assert band.shape == (ROWS, WINDOW, DIM) and band.data_ptr() == kv.data_ptr()
    assert torch.equal(band[10], kv[10 : 10 + WINDOW])


def test_band_bias_masks_invalid_token_rows():
    valid = torch.tensor([False, False, True, True, True, True])
    bias = band_bias(valid, 3)
    assert bias.dtype == torch.float32 and bias.shape == (4, 3)
    assert torch.equal(torch.isinf(bias), torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0], [0, 0, 0]]).bool())


@pytest.mark.parametrize("mode", ["picked", "prefix"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_dense_oracle(gen, mode, dtype):
    """Small row and key blocks, so that blocks end mid-table and the last row block is partial."""
    inputs = make_inputs(gen, "cpu", dtype, mode)
    check(sparse_prefill_attention_reference, inputs, dtype, row_block=8, key_block=4)


def test_reference_with_no_picks_attends_window_and_sink_only(gen):
    inputs = make_inputs(gen, "cpu", torch.float32, "picked", picks=0)
    check(sparse_prefill_attention_reference, inputs, torch.float32)


def test_rows_with_nothing_visible_return_zeros(gen):
    """Row 4 has its whole window masked and no picks (or limit 0): the sink takes all the mass."""
    for mode in ["picked", "prefix"]:
        got = sparse_prefill_attention_reference(**make_inputs(gen, "cpu", torch.float32, mode))
        assert torch.equal(got[4], torch.zeros_like(got[4]))


def test_public_op_takes_the_reference_on_cpu(gen):
    inputs = make_inputs(gen, "cpu", torch.float32, "prefix")
    assert torch.equal(sparse_prefill_attention(**inputs), sparse_prefill_attention_reference(**inputs))


def test_reference_temporaries_do_not_grow_with_the_table_in_prefix_mode(gen):
    """Every row sees the whole table, yet the largest temporary for 1024 table rows equals that for 64."""
    largest = {}
    for table in [64, 1024]:
        inputs = make_inputs(gen, "cpu", torch.bfloat16, "prefix", table=table)
        inputs["comp_limit"][:] = table
        with LargestTensor() as mode:
            sparse_prefill_attention_reference(**inputs, row_block=16, key_block=16)
        largest[table] = mode.largest
    assert largest[1024] == largest[64] <= ROWS * HEADS * DIM  # at most the output itself


def test_inputs_are_validated(gen):
    inputs = make_inputs(gen, "cpu", torch.float32, "picked")
    with pytest.raises(ValueError, match="exactly one"):
        sparse_prefill_attention_reference(**inputs, comp_limit=torch.zeros(ROWS, dtype=torch.int64))
    with pytest.raises(ValueError, match="exactly one"):
        sparse_prefill_attention_reference(**{k: v for k, v in inputs.items() if k != "comp_idx"})
    with pytest.raises(ValueError, match="comp_idx must be int64"):
        sparse_prefill_attention_reference(**{**inputs, "comp_idx": inputs["comp_idx"].int()})
    with pytest.raises(ValueError, match="window_bias must be fp32"):
        sparse_prefill_attention_reference(**{**inputs, "window_bias": inputs["window_bias"].half()})
    with pytest.raises(ValueError, match="one dtype"):
        sparse_prefill_attention_reference(**{**inputs, "q": inputs["q"].half()})
    with pytest.raises(ValueError, match="window_kv must be"):
        sparse_prefill_attention_reference(**{**inputs, "window_kv": inputs["window_kv"][1:]})


def test_plan_splits_uses_one_split_for_many_rows_and_respects_the_bound():
    assert plan_splits(rows=4096, heads=64, entries=128 + 8192) == (1, (128 + 8192 + 31) // 32 * 32)
    assert plan_splits(rows=2, heads=64, entries=128 + 8192)[0] > 1
    assert plan_splits(rows=2, heads=64, entries=128 + 8192, max_splits=3)[0] <= 3


@needs_triton
@pytest.mark.parametrize("mode", ["picked", "prefix"])
def test_triton_matches_dense_oracle(gen, device, mode):
    check(sparse_prefill_attention_triton, make_inputs(gen, device, torch.float32, mode), torch.float32)


@needs_triton
@pytest.mark.parametrize("dtype", KERNEL_HALF_DTYPES)
def test_triton_matches_dense_oracle_in_16_bits(gen, device, dtype):
    check(sparse_prefill_attention_triton, make_inputs(gen, device, dtype, "prefix"), dtype)


class CreatedShapes(TorchDispatchMode):
    """Records the shape of every tensor an op creates with storage of its own while the mode is active (not
    views, nor `set_`, with which the Triton interpreter rewraps a kernel's arguments on their storage)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and func.overloadpacket is not torch.ops.aten.set_:
            outs = out if isinstance(out, (tuple, list)) else [out]
            self.shapes += [tuple(t.shape) for t in outs if isinstance(t, torch.Tensor)]
        return out


@needs_triton
def test_triton_reads_the_window_band_and_the_strided_table_in_place(gen, device):
    inputs = make_inputs(gen, device, torch.float16, "picked")
    with CreatedShapes() as mode:
        sparse_prefill_attention_triton(**inputs)
    assert not [shape for shape in mode.shapes if shape[-2:] in [(WINDOW, DIM), (TABLE, DIM)]]


@needs_triton
def test_triton_with_no_picks_attends_window_and_sink_only(gen, device):
    check(sparse_prefill_attention_triton, make_inputs(gen, device, torch.float32, "picked", picks=0), torch.float32)


@needs_triton
@pytest.mark.parametrize("mode", ["picked", "prefix"])
def test_triton_splits_few_rows_and_cuts_many_into_blocks_under_the_budget(gen, device, mode):
    """105 entries (4 blocks of 32): the default budget runs all 37 rows in one launch of 4 splits; a budget of
    5 rows' accumulators runs 8 launches of one split, but the last, of 2 rows, with 2 splits."""
    inputs = make_inputs(gen, device, torch.float32, mode, picks=100, table=100)
    check(sparse_prefill_attention_triton, inputs, torch.float32)
    check(sparse_prefill_attention_triton, inputs, torch.float32, budget_bytes=5 * HEADS * DIM * 4)


@needs_triton
def test_triton_prefix_mode_with_a_tight_comp_len(gen, device):
    inputs = make_inputs(gen, device, torch.float32, "prefix")
    inputs["comp_limit"] = inputs["comp_limit"].clamp(max=11)
    check(sparse_prefill_attention_triton, inputs, torch.float32, comp_len=11)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["picked", "prefix"])
def test_triton_matches_reference_at_real_sizes_on_gpu(gen, mode):
    rows, heads, dim, window, table = 300, 64, 512, 128, 2048
    kv = torch.randn(rows + window - 1, dim, generator=gen).to("cuda", torch.bfloat16)
    inputs = dict(
        q=torch.randn(rows, heads, dim, generator=gen).to("cuda", torch.bfloat16),
        window_kv=window_band(kv, window),
        window_bias=band_bias(torch.arange(rows + window - 1, device="cuda") >= 50, window),
        comp=torch.randn(table, dim, generator=gen).to("cuda", torch.bfloat16),
        sinks=torch.randn(heads, generator=gen).cuda(),
        scale=dim**-0.5,
    )
    if mode == "picked":
        inputs["comp_idx"] = torch.randint(-1, table, (rows, 512), generator=gen).cuda()
    else:
        inputs["comp_limit"] = (torch.arange(rows, device="cuda") * table // rows).long()
    want = sparse_prefill_attention_reference(**inputs)
    torch.testing.assert_close(sparse_prefill_attention(**inputs), want, **HALF_TOL)
