"""The FP8 cold pool: e4m3 codes + one fp32 scale per entry, about half the bytes of bf16, dequantized on recall."""

import pytest
import torch
from transformers import DynamicCache

import fm_transformers as fm
from fm_transformers.config import LSAConfig
from fm_transformers.decode_graph import DecodeGraph
from fm_transformers.fp8 import FP8_DTYPE, dequantize_fp8, quantize_fp8
from fm_transformers.cold_pool import ColdPool
from fm_transformers.pool import HotSet
from tests.conftest import greedy, max_logit_difference, random_prompt


def test_quantization_error_is_within_e4m3_rounding_of_each_entry():
    entries = torch.randn(3, 50, 64) * torch.logspace(-3, 3, 50)[:, None]  # entries of very different sizes
    codes, scales = quantize_fp8(entries)
    assert codes.dtype == FP8_DTYPE and scales.shape == (3, 50, 1) and scales.dtype == torch.float32
    restored = dequantize_fp8(codes, scales, torch.float32)
    amax = entries.abs().amax(-1, keepdim=True)
    torch.testing.assert_close(restored.abs().amax(-1, keepdim=True), amax, rtol=1e-6, atol=0)  # it maps to 448
    # 3 mantissa bits: half a step is 2^-4 of the number; below e4m3's normals (2^-6) a step is 2^-9 * scale.
    bound = torch.maximum(entries.abs() * 2**-4, scales * 2**-10)
    assert ((restored - entries).abs() <= bound * (1 + 1e-6)).all()


def test_an_all_zero_entry_round_trips_to_zero():
    codes, scales = quantize_fp8(torch.zeros(1, 2, 8))
    assert torch.equal(dequantize_fp8(codes, scales, torch.bfloat16), torch.zeros(1, 2, 8, dtype=torch.bfloat16))


@pytest.mark.parametrize("dim", [512, 128])  # V4-Flash: compressed KV, indexer keys
def test_fp8_pool_stores_about_half_the_bytes_of_bf16_for_the_same_entries(dim):
    entries = torch.randn(2, 1500, dim, dtype=torch.bfloat16)
    pools = {dtype: ColdPool(2, dim, dtype, pin_memory=False, slab_chunks=1024) for dtype in (torch.bfloat16, FP8_DTYPE)}
    for pool in pools.values():
        pool.append(entries)
    bf16, fp8 = pools[torch.bfloat16], pools[FP8_DTYPE]
    assert fp8.stored_bytes() / bf16.stored_bytes() == (dim + 4) / (2 * dim)  # codes + a 4-byte scale per entry
    assert 0.5 < fp8.stored_bytes() / bf16.stored_bytes() < 0.52
    assert fp8.allocated_bytes() / bf16.allocated_bytes() == (dim + 4) / (2 * dim)
    assert fp8.entry_bytes() == dim + 4 and bf16.entry_bytes() == 2 * dim


def test_recall_from_an_fp8_pool_dequantizes_into_the_model_dtype():
    pool = ColdPool(2, 16, FP8_DTYPE, pin_memory=False, slab_chunks=4)
    hot = HotSet({"kv": 16}, 2, torch.device("cpu"), torch.bfloat16, tail_reserve=2)
    entries = torch.randn(2, 10, 16, dtype=torch.bfloat16)
    pool.append(entries)
    fetch = lambda kind, *where: pool.fetch_into(*where)  # noqa: E731
    assert hot.recall([torch.tensor([1, 2, 3, 9]), torch.tensor([0, 5])], horizon=10, fetch=fetch) == 6
    slots, chunk_ids = hot.candidates()
    expected = dequantize_fp8(*quantize_fp8(entries), torch.bfloat16)
    for row in range(2):
        valid = chunk_ids[row] >= 0
        assert torch.equal(hot.table("kv")[slots[row, valid]], expected[row, chunk_ids[row, valid]])
    assert torch.equal(pool.read(), dequantize_fp8(*quantize_fp8(entries), torch.float32))


def test_fp8_pool_reorder_keeps_each_entry_with_its_scale():
    pool = ColdPool(3, 8, FP8_DTYPE, pin_memory=False, slab_chunks=4)
    entries = torch.randn(3, 6, 8) * torch.tensor([1.0, 100.0, 0.01])[:, None, None]
    pool.append(entries)
    before = pool.read()
    pool.reorder(torch.tensor([2, 0, 0]))
    assert torch.equal(pool.read(), before[[2, 0, 0]])


def teacher_forced_logits(model, prompt, cache, tokens, from_pool=False):
    """(steps, vocab) last-token logits of the prompt and of each of `tokens` fed in turn. With `from_pool`,
    after the prefill every CSA layer drops its device copy and recalls every chunk from its cold pool, so all
    chunks that attention reads from then on came through the pool (those made later stay exact on the device)."""
    logits = []
    with torch.no_grad():
        logits.append(model(prompt, past_key_values=cache).logits[0, -1])
        if from_pool:
            cache.finish_prefill()
            for layer in cache.lookahead_layers():
                everything = [torch.arange(layer.num_chunks)]
                layer.recall([everything[0][:0]], layer.num_chunks)
                layer.recall(everything, layer.num_chunks)
        for token in tokens:
            logits.append(model(token.view(1, 1).to(prompt.device), past_key_values=cache).logits[0, -1])
    return torch.stack(logits)


def test_keep_all_with_an_fp8_pool_stays_within_fp8_error_of_stock(model):
    """Keep-all with every prompt chunk recalled from the FP8 pool (KV and the non-target indexer keys), teacher
    forced on the stock tokens. Measured (tiny model, float32, prompts of seeds 3-5, 30 steps): mean |logit
    error| 0.006-0.030 against a logit std of about 1.6; max 0.06-1.03, the largest where the dequantized indexer
    keys flip a near-tie of the native top-k. A pool in bf16 gives 0.0004-0.010 mean, one in float32 exactly 0."""
    prompt = random_prompt(41, seed=3)
    with torch.no_grad():
        tokens = model.generate(prompt, max_new_tokens=30, do_sample=False, pad_token_id=0)[0, prompt.shape[1] : -1]
    stock = teacher_forced_logits(model, prompt, DynamicCache(config=model.config), tokens)
    errors = {}
    for pool_dtype in ("float32", "float8_e4m3fn"):
        config = {"tau": 4, "recency_chunks": 0, "sink_chunks": 0, "pool_dtype": pool_dtype}
        cache = fm.OffloadedLookaheadCache(model, config, policy=fm.KeepAllPolicy())
        lsa = teacher_forced_logits(model, prompt, cache, tokens, from_pool=True)
        assert cache.memory_report()["chunks_fetched"] == 10 * len(cache.csa_layers)  # the prompt's 10 chunks
        errors[pool_dtype] = (lsa - stock).abs()
    assert errors["float32"].max() < 1e-5  # the same path without quantization is exact
    assert 0 < errors["float8_e4m3fn"].mean() < 0.05 * stock.std()
    assert errors["float8_e4m3fn"].max() < 2.0


def test_memory_report_halves_host_and_recall_bytes_with_an_fp8_pool(model):
    reports = {}
    for pool_dtype in ("bfloat16", "float8_e4m3fn"):
        config = {"tau": 4, "recency_chunks": 0, "sink_chunks": 0, "pool_dtype": pool_dtype}
        cache = fm.OffloadedLookaheadCache(model, config, policy=fm.KeepAllPolicy())
        teacher_forced_logits(model, random_prompt(41, seed=3), cache, torch.tensor([5, 6]), from_pool=True)
        reports[pool_dtype] = cache.memory_report()
    bf16, fp8 = reports["bfloat16"], reports["float8_e4m3fn"]
    kv_dim, key_dim = model.config.head_dim, model.config.index_head_dim  # tiny: 32 and 16
    assert fp8["host"]["csa_kv_stored"] / bf16["host"]["csa_kv_stored"] == (kv_dim + 4) / (2 * kv_dim)
    assert fp8["host"]["csa_index_keys_stored"] / bf16["host"]["csa_index_keys_stored"] == (key_dim + 4) / (2 * key_dim)
    assert fp8["chunks_fetched"] == bf16["chunks_fetched"] > 0
    assert fp8["bytes_fetched"] / bf16["bytes_fetched"] == (kv_dim + key_dim + 8) / (2 * (kv_dim + key_dim))
    assert fp8["full_csa_bytes"] == bf16["full_csa_bytes"]  # what the stock cache holds does not change


def test_fp8_pool_dtype_is_accepted_and_named_in_the_error_for_others():
    assert LSAConfig(pool_dtype="float8_e4m3fn").torch_pool_dtype(torch.bfloat16) == FP8_DTYPE
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        LSAConfig(pool_dtype="float8_e5m2")


@pytest.mark.gpu
def test_fp8_recall_on_the_copy_stream_dequantizes_pinned_slabs_read_in_place():
    stream = torch.cuda.Stream()
    pool = ColdPool(2, 512, FP8_DTYPE, pin_memory=True, slab_chunks=1024)
    hot = HotSet({"kv": 512}, 2, torch.device("cuda"), torch.bfloat16, tail_reserve=4, copy_stream=stream)
    entries = torch.randn(2, 5000, 512, dtype=torch.bfloat16)
    pool.append(entries.cuda())  # quantized on the GPU, codes and scales copied to the pinned slabs
    fetch = lambda kind, *where: pool.fetch_into(*where)  # noqa: E731
    ids = [torch.randperm(5000)[:2000].sort().values for _ in range(2)]
    assert hot.recall(ids, horizon=5000, fetch=fetch) == 4000
    slots, chunk_ids = hot.candidates()
    expected = dequantize_fp8(*quantize_fp8(entries.cuda()), torch.bfloat16).cpu()  # quantized where the pool's were
    got = hot.table("kv")[slots.clamp(min=0)].cpu()
    for row in range(2):
        assert torch.equal(got[row], expected[row, chunk_ids[row].cpu()])


def test_fixed_shape_decode_with_page_recall_and_an_fp8_pool_matches_eager(model):
    """The CUDA-graph decode step (decode_graph.py, run uncaptured here) writes entries in place and flushes
    them to the pool before each recall: through an FP8 pool and page recall it decodes as eager LSA does."""
    prompt = random_prompt(45, batch=2, seed=3)
    options = {"tau": 8, "sink_chunks": 1, "recency_chunks": 1, "page_chunks": 2, "page_budget": 0.5, "pool_dtype": "float8_e4m3fn"}
    runs = []
    for static in (False, True):
        cache = fm.OffloadedLookaheadCache(model, options, policy=fm.RandomPolicy(0.3, seed=1))
        if static:
            cache.decode_graph = DecodeGraph(model, cache, capture=False)
        runs.append((greedy(model, prompt, max_new_tokens=30, past_key_values=cache), cache))
    (eager, eager_cache), (static, static_cache) = runs
    assert static_cache.decode_graph.state is not None  # the fixed-shape step did run
    assert torch.equal(eager.sequences, static.sequences) and max_logit_difference(eager, static) < 1e-4
    eager_report, static_report = eager_cache.memory_report(), static_cache.memory_report()
    assert static_report["host"] == eager_report["host"]
    assert static_report["bytes_fetched"] == eager_report["bytes_fetched"] > 0
