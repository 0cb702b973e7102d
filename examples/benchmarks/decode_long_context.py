"""Decode at long context on one GPU: the stock DeepSeek-V4 cache and LSA side by side, in one run.

A DeepSeek-V4-Flash-shaped model (64 heads x 512, indexer 64 x 128, top-k 512, window 128, CSA rate 4,
HCA rate 128) at reduced depth (2 sliding, 3 CSA, 3 HCA layers) with a few small experts, random bf16
weights. The context is synthesized: each cache receives the same random compressed entries and windows
as if a prompt of that length had been prefilled (a stock prefill of 512K tokens would take minutes), then
both decode the same tokens. LSA uses a fresh memory indexer on the three CSA layers and a 10% budget.

Measured per context: CSA cache bytes on the GPU (read off the cache tensors), peak allocated memory during
decode, decode ms/token, recall ms and bytes. Then kernel timings at 128K against their memory floor and
the gather bandwidth against the pinned host-to-device bandwidth measured in the same run.
Prints a table last; writes everything as JSON to --out.
"""

import argparse
import json
import statistics
import time
from types import SimpleNamespace

import torch
from fm_transformers.kernels import (
    gather_chunks,
    gather_chunks_copy,
    level2_topk,
    sparse_decode_attention,
)
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM, DynamicCache
from transformers.models.deepseek_v4.modeling_deepseek_v4 import eager_attention_forward

import fm_transformers as fm
from fm_transformers.report import stock_csa_bytes

CSA, HCA, SLIDING = "compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"


def flash_shaped_config(small: bool) -> DeepseekV4Config:
    heads, head_dim, hidden = (4, 64, 128) if small else (64, 512, 4096)
    return DeepseekV4Config(
        vocab_size=1024, hidden_size=hidden, moe_intermediate_size=256, num_hidden_layers=8,
        layer_types=[SLIDING, SLIDING, CSA, HCA, CSA, HCA, CSA, HCA],
        num_attention_heads=heads, head_dim=head_dim, q_lora_rank=hidden // 4, o_groups=4 if small else 8,
        o_lora_rank=hidden // 4, index_n_heads=8 if small else 64, index_head_dim=32 if small else 128,
        index_topk=64 if small else 512, sliding_window=128, n_routed_experts=8, num_experts_per_tok=2,
        max_position_embeddings=1 << 21, rope_parameters={"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 65536},
    )


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def fill_context(model, cache, tokens: int, seed: int):
    """Give every layer of `cache` the state a `tokens`-long prefill leaves: a full window, compressed
    entries (CSA KV + indexer keys, HCA KV). Same seed, same entries for the stock cache and LSA."""
    config, device, dtype = model.config, model.device, model.dtype
    generator = torch.Generator(device=device).manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=generator, device=device, dtype=dtype)  # noqa: E731
    for index, layer in enumerate(cache.layers):
        window = randn(1, 1, config.sliding_window - 1, config.head_dim)
        layer.update(window, window)
        layer.cumulative_length = tokens
        kind = config.layer_types[index]
        if kind == CSA:
            layer.update_compressor_states("compressor", randn(1, tokens // 4, config.head_dim))
            layer.update_compressor_states("indexer", randn(1, tokens // 4, config.index_head_dim))
        elif kind == HCA:
            layer.update_compressor_states("compressor", randn(1, tokens // 128, config.head_dim))


def decode(model, cache, tokens: int, steps: int):
    """Per-step wall times (ms) of `steps` single-token forwards after a `tokens`-long context."""
    device = model.device
    generator = torch.Generator().manual_seed(1)
    times = []
    with torch.no_grad():
        for step in range(steps):
            input_ids = torch.randint(4, model.config.vocab_size, (1, 1), generator=generator).to(device)
            position_ids = torch.tensor([[tokens + step]], device=device)
            synchronize(device)
            start = time.perf_counter()
            model(input_ids=input_ids, position_ids=position_ids, past_key_values=cache, use_cache=True)
            synchronize(device)
            times.append((time.perf_counter() - start) * 1e3)
    return times


def run_stock(model, tokens, steps):
    cache = DynamicCache(config=model.config)
    fill_context(model, cache, tokens, seed=tokens)
    reset_peak(model.device)
    times = decode(model, cache, tokens, steps)
    return {"csa_gpu_bytes": stock_csa_bytes(cache, model.config.layer_types),
        "csa_kv_gpu_bytes": stock_csa_bytes(cache, model.config.layer_types, ("compressor",)), "peak_bytes": peak(model.device), "ms_per_token": statistics.median(times[2:])}


def run_lsa(model, tokens, steps, tau):
    config = {"tau": tau, "threshold": 0.5, "resident_budget": 0.1, "recency_chunks": 64, "sink_chunks": 4}
    cache = fm.OffloadedLookaheadCache(model, config)
    fill_context(model, cache, tokens, seed=tokens)
    trigger_after_prefill(model, cache, tokens)
    decode(model, cache, tokens, 1)  # applies the first resident set: the prefill's device copy goes away
    fetched_before = cache.memory_report()["chunks_fetched"]
    reset_peak(model.device)
    times = decode(model, cache, tokens + 1, steps)
    report = cache.memory_report()
    recall_step = tau  # the step after the trigger applies the new resident set
    steady = statistics.median(times[2:])
    entry_bytes = model.config.head_dim * model.dtype.itemsize + model.config.index_head_dim * model.dtype.itemsize
    return {
        "csa_gpu_bytes": report["device"]["csa_kv"] + report["device"]["csa_index_keys"],
        "csa_kv_gpu_bytes": report["device"]["csa_kv"],
        "peak_bytes": peak(model.device),
        "ms_per_token": statistics.mean(times[2:]),
        "ms_per_token_median": steady,
        "recall_ms": times[recall_step] - steady if len(times) > recall_step else None,
        "trigger_ms": times[recall_step - 1] - steady if len(times) >= recall_step else None,
        "recall_chunks": report["chunks_fetched"] - fetched_before,
        "recall_bytes_upper": (report["chunks_fetched"] - fetched_before) * entry_bytes,
        "report": report,
    }


def trigger_after_prefill(model, cache, tokens):
    """Run the level-1 trigger that closes a prefill, with random hidden states for the last token."""
    generator = torch.Generator(device=model.device).manual_seed(7)
    hidden = torch.randn(1, model.config.hidden_size, generator=generator, device=model.device, dtype=model.dtype)
    position = torch.tensor([tokens - 1], device=model.device)
    cache.forward_index, cache.triggering = 0, True
    with torch.no_grad():
        for layer in cache.csa_layers:
            cache.end_csa_layer(layer, hidden, position)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak(device) -> int | None:
    return torch.cuda.max_memory_allocated() if device.type == "cuda" else None


def time_op(fn, repeats=20) -> float:
    """Median milliseconds of fn() with CUDA events (wall clock on CPU)."""
    fn()
    samples = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(samples)


def kernel_section(device, small: bool) -> dict:
    """Kernel times at 128K (10% resident) against their memory floors, and gather vs pinned H2D bandwidth."""
    dtype, heads, head_dim, index_dim, topk = torch.bfloat16, 64, 512, 128, 512
    chunks = (8192 if small else 131072) // 4
    resident = chunks // 10
    big = 1 << (24 if small else 30)
    src, dst = torch.empty(big, dtype=torch.uint8, device=device), torch.empty(big, dtype=torch.uint8, device=device)
    hbm = 2 * big / time_op(lambda: dst.copy_(src)) / 1e6  # GB/s
    pinned = torch.empty(big, dtype=torch.uint8, pin_memory=device.type == "cuda")
    h2d = big / time_op(lambda: dst.copy_(pinned, non_blocking=True)) / 1e6
    pool = torch.randn(big // (head_dim * 2), head_dim, dtype=dtype).pin_memory() if device.type == "cuda" else torch.randn(big // (head_dim * 2), head_dim, dtype=dtype)
    count = pool.shape[0] // 10
    src_idx = torch.randperm(pool.shape[0], device=device)[:count]
    slots = torch.empty(count, head_dim, dtype=dtype, device=device)
    dst_idx = torch.arange(count, device=device)
    moved = count * head_dim * 2
    gather_mapped = moved / time_op(lambda: gather_chunks(pool, src_idx, slots, dst_idx)) / 1e6
    gather_copy = moved / time_op(lambda: gather_chunks_copy(pool, src_idx, slots, dst_idx), repeats=5) / 1e6

    q_index, weights = torch.randn(1, heads, index_dim, device=device, dtype=dtype), torch.randn(1, heads, device=device)
    keys_all = torch.randn(chunks, index_dim, device=device, dtype=dtype)
    kv_all = torch.randn(chunks, head_dim, device=device, dtype=dtype)
    cand = torch.randperm(chunks, device=device)[:resident].unsqueeze(0)
    l2 = time_op(lambda: level2_topk(q_index, weights, keys_all, cand, None, topk, index_dim**-0.5))
    q = torch.randn(1, heads, head_dim, device=device, dtype=dtype)
    window, window_bias = torch.randn(1, 128, head_dim, device=device, dtype=dtype), torch.zeros(1, 128, device=device)
    sinks, picked = torch.randn(heads, device=device), cand[:, :topk]
    attn = time_op(lambda: sparse_decode_attention(q, window, window_bias, kv_all, picked, sinks, head_dim**-0.5))

    module = SimpleNamespace(num_key_value_groups=heads, sinks=sinks, training=False)

    def stock_step():  # the stock masked eager path: score all, top-k, attend window + all entries with a mask
        scores = (torch.relu(torch.einsum("bhd,td->bht", q_index.float(), keys_all.float())) * weights[..., None]).sum(1)
        top = scores.topk(topk, dim=-1).indices
        bias = torch.full((1, 1, 1, chunks), float("-inf"), device=device, dtype=dtype).scatter_(-1, top[:, None, None], 0.0)
        mask = torch.cat([torch.zeros(1, 1, 1, 128, device=device, dtype=dtype), bias], dim=-1)
        kv = torch.cat([window, kv_all.unsqueeze(0)], dim=1).unsqueeze(1)
        return eager_attention_forward(module, q.unsqueeze(2), kv, kv, mask, scaling=head_dim**-0.5)

    stock = time_op(stock_step, repeats=10)
    floor_l2 = resident * index_dim * 2 / hbm / 1e6
    floor_attn = (128 + topk) * head_dim * 2 / hbm / 1e6
    return {
        "hbm_gbps": hbm, "pinned_h2d_gbps": h2d, "gather_mapped_gbps": gather_mapped, "gather_copy_gbps": gather_copy,
        "level2_ms": l2, "level2_floor_ms": floor_l2, "attention_ms": attn, "attention_floor_ms": floor_attn,
        "stock_layer_step_ms": stock, "lsa_layer_step_ms": l2 + attn,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="32768,131072,524288,1048576")
    parser.add_argument("--steps", type=int, default=72, help="decode steps per LSA run (one recall at step tau)")
    parser.add_argument("--stock-steps", type=int, default=12)
    parser.add_argument("--tau", type=int, default=64)
    parser.add_argument("--small", action="store_true", help="tiny sizes, for a CPU smoke test of this script")
    parser.add_argument("--out", default="decode_long_context.json")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    with torch.device(device):
        model = DeepseekV4ForCausalLM(flash_shaped_config(args.small)).to(torch.bfloat16).eval()
    csa_layers = [i for i, kind in enumerate(model.config.layer_types) if kind == CSA]
    fm.attach_memory_indexer(model, fm.MemoryIndexerModel.from_backbone(model, layers=csa_layers, num_heads=128, rank=2048 if not args.small else 64))
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    results = {"gpu": gpu, "contexts": {}}
    for tokens in [int(value) for value in args.contexts.split(",")]:
        row = {}
        try:
            row["stock"] = run_stock(model, tokens, args.stock_steps)
        except torch.OutOfMemoryError:
            row["stock"] = "out of memory"
        torch.cuda.empty_cache() if device.type == "cuda" else None
        row["lsa"] = run_lsa(model, tokens, args.steps, args.tau)
        torch.cuda.empty_cache() if device.type == "cuda" else None
        results["contexts"][tokens] = row
        print(json.dumps({tokens: {k: v if isinstance(v, str) else {m: n for m, n in v.items() if m != "report"} for k, v in row.items()}}), flush=True)
    results["kernels"] = kernel_section(device, args.small)
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=1, default=str)
    print_table(results)


def print_table(results):
    gib = lambda value: f"{value / 2**30:7.3f}" if isinstance(value, (int, float)) else "   n/a"  # noqa: E731
    print(f"\nGPU: {results['gpu']}  (batch 1, bf16, 8 layers: 2 sliding, 3 CSA, 3 HCA)")
    print("CSA = compressed KV + indexer keys of the CSA layers (all 3 are memory-indexer target layers here, so their")
    print("indexer keys stay on the GPU in full); KV ratio = compressed KV alone.")
    print("context | CSA GiB stock | CSA GiB LSA | ratio | KV ratio | peak GiB stock | peak GiB LSA | ms/tok stock | ms/tok LSA | LSA/stock | recall ms | recall MiB")
    for tokens, row in results["contexts"].items():
        stock, lsa = row["stock"], row["lsa"]
        fits = isinstance(stock, dict)
        ratio = f"{lsa['csa_gpu_bytes'] / stock['csa_gpu_bytes']:.3f}" if fits else "  -  "
        kv_ratio = f"{lsa['csa_kv_gpu_bytes'] / stock['csa_kv_gpu_bytes']:.3f}" if fits else "  -  "
        speed = f"{lsa['ms_per_token'] / stock['ms_per_token']:.2f}" if fits else " OOM "
        recall_ms = f"{lsa['recall_ms']:.1f}" if lsa["recall_ms"] is not None else "-"
        print(
            f"{int(tokens) // 1024:6d}K | {gib(stock['csa_gpu_bytes']) if fits else '    OOM'} | {gib(lsa['csa_gpu_bytes'])} | {ratio} | {kv_ratio} | "
            f"{gib(stock['peak_bytes']) if fits else '    OOM'} | {gib(lsa['peak_bytes'])} | "
            f"{stock['ms_per_token'] if fits else float('nan'):8.1f} | {lsa['ms_per_token']:8.1f} | {speed} | {recall_ms} | {lsa['recall_bytes_upper'] / 2**20:.1f}"
        )
    k = results["kernels"]
    print(f"\nHBM copy {k['hbm_gbps']:.0f} GB/s; pinned H2D {k['pinned_h2d_gbps']:.1f} GB/s; gather mapped {k['gather_mapped_gbps']:.1f} GB/s "
          f"({k['gather_mapped_gbps'] / k['pinned_h2d_gbps']:.0%} of H2D), gather via staging copy {k['gather_copy_gbps']:.1f} GB/s")
    print(f"128K, one CSA layer step: level-2 top-k {k['level2_ms'] * 1e3:.0f} us (floor {k['level2_floor_ms'] * 1e3:.1f} us), "
          f"sparse attention {k['attention_ms'] * 1e3:.0f} us (floor {k['attention_floor_ms'] * 1e3:.1f} us); "
          f"stock masked eager {k['stock_layer_step_ms'] * 1e3:.0f} us -> {k['stock_layer_step_ms'] / k['lsa_layer_step_ms']:.1f}x")


if __name__ == "__main__":
    main()
