"""Decode at long context on one GPU: the stock DeepSeek-V4 cache and LSA side by side, in one run.

A DeepSeek-V4-Flash-shaped model (64 heads x 512, indexer 64 x 128, top-k 512, window 128, CSA rate 4,
HCA rate 128) at reduced depth (2 sliding, 3 CSA, 3 HCA layers) with a few small experts, random bf16
weights. The context is synthesized: each cache receives the same random compressed entries and windows
as if a prompt of that length had been prefilled (a stock prefill of 512K tokens would take minutes), then
both decode the same tokens. LSA uses a fresh memory indexer on the three CSA layers and a 10% budget.

Measured per context and batch size: CSA cache bytes on the GPU (read off the cache tensors), peak allocated
memory during decode, decode ms/token, the extra time over the median step of the level-1 trigger step (which
queues the recall on its own stream) and of the step after it (which waits for the copies; step-to-step noise
can make it negative, printed as <0), and the bytes recalled. A stock run
that does not fit is reported as OOM and the LSA run is still measured. Then, per batch size, each kernel's
time against its memory floor (bytes it must move over the HBM bandwidth measured in this run), and the
gather bandwidth against the pinned host-to-device bandwidth measured in this run.
A small LSA run with refresh goes first, untimed, so that no timed step compiles a kernel.
With --refresh, a third run per context and batch: LSA with every CSA layer a refresh layer (refresh on a
miss, LSAConfig.refresh_layers), its ms/token, refreshes and bytes fetched per step. With random weights
the native top-k wanders from step to step, so this is the refresh's worst case.
With --page-recall, another LSA run recalls whole pages (LSAConfig.page_chunks, --page-chunks) under a page
budget of the same 10% instead of the chunk budget; with --fp8-pool, another keeps its cold pool in FP8
(LSAConfig.pool_dtype="float8_e4m3fn"). A table then sets them beside chunk-granular bf16 LSA: recall bytes
(host bytes read), contiguous host ranges read (the copies a copy engine would issue), trigger time, host bytes.
Prints a short table last; writes everything as JSON to --out. `--quick` runs tiny sizes (a CPU smoke run).
"""

import argparse
import gc
import json
import statistics
import time
from types import SimpleNamespace

import torch
from fm_transformers.kernels import gather_chunks, gather_chunks_copy, level2_topk, sparse_decode_attention
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM, DynamicCache
from transformers.models.deepseek_v4.modeling_deepseek_v4 import eager_attention_forward

import fm_transformers as fm
from fm_transformers.cache import LookaheadCSALayer
from fm_transformers.decode_graph import DecodeGraph
from fm_transformers.report import stock_csa_bytes

CSA, HCA, SLIDING = "compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"
OOM = "OOM"


def flash_shaped_config(quick: bool) -> DeepseekV4Config:
    heads, head_dim, hidden = (4, 64, 128) if quick else (64, 512, 4096)
    return DeepseekV4Config(
        vocab_size=1024, hidden_size=hidden, moe_intermediate_size=256, num_hidden_layers=8,
        layer_types=[SLIDING, SLIDING, CSA, HCA, CSA, HCA, CSA, HCA],
        num_attention_heads=heads, head_dim=head_dim, q_lora_rank=hidden // 4, o_groups=4 if quick else 8,
        o_lora_rank=hidden // 4, index_n_heads=8 if quick else 64, index_head_dim=32 if quick else 128,
        index_topk=64 if quick else 512, sliding_window=128, n_routed_experts=8, num_experts_per_tok=2,
        max_position_embeddings=1 << 21, rope_parameters={"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 65536},
    )


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def fill_context(model, cache, tokens: int, batch: int, seed: int):
    """Give every layer of `cache` the state a `tokens`-long prefill of `batch` sequences leaves: a full window,
    compressed entries (CSA KV + indexer keys, HCA KV). Same seed, same entries for the stock cache and LSA."""
    config, device, dtype = model.config, model.device, model.dtype
    generator = torch.Generator(device=device).manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=generator, device=device, dtype=dtype)  # noqa: E731
    for index, layer in enumerate(cache.layers):
        window = randn(batch, 1, config.sliding_window - 1, config.head_dim)
        layer.update(window, window)
        layer.cumulative_length = tokens
        kind = config.layer_types[index]
        if kind == CSA:
            store = layer.store_entries if isinstance(layer, LookaheadCSALayer) else layer.update_compressor_states
            store("compressor", randn(batch, tokens // 4, config.head_dim))
            store("indexer", randn(batch, tokens // 4, config.index_head_dim))
        elif kind == HCA:
            layer.update_compressor_states("compressor", randn(batch, tokens // 128, config.head_dim))


def decode(model, cache, tokens: int, batch: int, steps: int):
    """Per-step wall times (ms) of `steps` single-token forwards after a `tokens`-long context, and after
    each step the number of level-1 triggers so far (None for a stock cache)."""
    device = model.device
    generator = torch.Generator().manual_seed(1)
    times, triggers = [], []
    with torch.no_grad():
        for step in range(steps):
            input_ids = torch.randint(4, model.config.vocab_size, (batch, 1), generator=generator).to(device)
            position_ids = torch.full((batch, 1), tokens + step, device=device)
            synchronize(device)
            start = time.perf_counter()
            model(input_ids=input_ids, position_ids=position_ids, past_key_values=cache, use_cache=True)
            synchronize(device)
            times.append((time.perf_counter() - start) * 1e3)
            triggers.append(getattr(cache, "trigger_count", None))
    return times, triggers


def kernel_ms_per_step(model, cache, tokens: int, batch: int, steps: int = 8) -> float | None:
    """GPU kernel time of a decode step: `steps` more steps under torch.profiler (CUDA kernels only), the
    kernels' device time summed over the steps. None off CUDA."""
    if model.device.type != "cuda":
        return None
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        decode(model, cache, tokens, batch, steps)
    return sum(event.self_device_time_total for event in profiler.key_averages()) / 1000 / steps


def run_stock(model, tokens, batch, steps, kernel_time=False):
    cache = DynamicCache(config=model.config)
    fill_context(model, cache, tokens, batch, seed=tokens)
    reset_peak(model.device)
    times, _ = decode(model, cache, tokens, batch, steps)
    layer_types = model.config.layer_types
    return {
        "csa_gpu_bytes": stock_csa_bytes(cache, layer_types),
        "csa_kv_gpu_bytes": stock_csa_bytes(cache, layer_types, ("compressor",)),
        "peak_bytes": peak(model.device),
        "ms_per_token": statistics.median(times[2:]),
        "kernel_ms_per_step": kernel_ms_per_step(model, cache, tokens + steps, batch) if kernel_time else None,
    }


def run_lsa(model, tokens, batch, steps, tau, refresh_layers=None, options=None, graph=False, kernel_time=False):
    """One LSA run; `options` replace or add cache options (page recall, pool dtype); `graph` decodes through
    the CUDA graph (decode_graph.py) as generate does on a GPU, else eagerly."""
    config = {"tau": tau, "threshold": 0.5, "resident_budget": 0.1, "recency_chunks": 64, "sink_chunks": 4}
    if refresh_layers:
        config["refresh_layers"] = refresh_layers
    config.update(options or {})
    cache = fm.OffloadedLookaheadCache(model, config)
    fill_context(model, cache, tokens, batch, seed=tokens)
    trigger_after_prefill(model, cache, tokens, batch)
    if graph:
        cache.decode_graph = DecodeGraph(model, cache, capture=model.device.type == "cuda")
    decode(model, cache, tokens, batch, 1)  # the first step on the first resident set
    before = cache.memory_report()
    reset_peak(model.device)
    times, triggers = decode(model, cache, tokens + 1, batch, steps)
    report = cache.memory_report()
    trigger_steps = [step for step in range(1, steps) if triggers[step] > triggers[step - 1]]
    steady = statistics.median(times[2:])
    trigger = trigger_steps[0] if trigger_steps and trigger_steps[0] + 1 < steps else None
    return {
        "csa_gpu_bytes": report["csa_device_bytes"],
        "csa_kv_gpu_bytes": report["device"]["csa_resident_kv"] + report["device"]["csa_tail_kv"],
        "csa_tail_room_bytes": report["device"]["csa_tail_room"],
        "peak_bytes": peak(model.device),
        "ms_per_token": statistics.mean(times[2:]),
        "ms_per_token_median": steady,
        "trigger_ms": times[trigger] - steady if trigger is not None else None,
        "after_trigger_ms": times[trigger + 1] - steady if trigger is not None else None,
        "recall_chunks": report["chunks_fetched"] - before["chunks_fetched"],
        "recall_bytes": report["bytes_fetched"] - before["bytes_fetched"],
        "recall_ranges": report["ranges_fetched"] - before["ranges_fetched"],
        "host_stored_bytes": report["host"]["csa_kv_stored"] + report["host"]["csa_index_keys_stored"],
        "refreshes": report["refreshes"] - before["refreshes"],
        "steps": steps,
        "kernel_ms_per_step": kernel_ms_per_step(model, cache, tokens + 1 + steps, batch) if kernel_time else None,
        "report": report,
    }


def trigger_after_prefill(model, cache, tokens, batch):
    """Run the level-1 trigger that closes a prefill, with random hidden states for the last token."""
    generator = torch.Generator(device=model.device).manual_seed(7)
    hidden = torch.randn(batch, model.config.hidden_size, generator=generator, device=model.device, dtype=model.dtype)
    position = torch.full((batch,), tokens - 1, device=model.device)
    cache.schedule.triggering = True
    with torch.no_grad():
        for layer in cache.csa_layers:
            cache.end_csa_layer(layer, hidden, position)


def measure(run, *args):
    """run(*args), or OOM when the GPU runs out of memory (the caller frees it before going on)."""
    try:
        return run(*args)
    except torch.OutOfMemoryError:
        return OOM


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak(device) -> int | None:
    return torch.cuda.max_memory_allocated() if device.type == "cuda" else None


def time_op(fn, repeats=20) -> float:
    """Median milliseconds of fn() over `repeats` calls after one warm-up call (which compiles the Triton
    kernels), each call timed alone with CUDA events (wall clock on CPU): an op whose GPU work is shorter than
    its launch measures its launch latency."""
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


def bandwidths(device, quick: bool) -> dict:
    """HBM (device-to-device copy), pinned host-to-device copy, and the recall gather, in GB/s."""
    dtype, head_dim = torch.bfloat16, 512
    big = 1 << (24 if quick else 30)
    src, dst = torch.empty(big, dtype=torch.uint8, device=device), torch.empty(big, dtype=torch.uint8, device=device)
    hbm = 2 * big / time_op(lambda: dst.copy_(src)) / 1e6  # read + write
    pinned = torch.empty(big, dtype=torch.uint8, pin_memory=device.type == "cuda")
    h2d = big / time_op(lambda: dst.copy_(pinned, non_blocking=True)) / 1e6
    pool = torch.randn(big // (head_dim * 2), head_dim, dtype=dtype, pin_memory=device.type == "cuda")
    count = pool.shape[0] // 10
    src_idx = torch.randperm(pool.shape[0], device=device)[:count]
    slots = torch.empty(count, head_dim, dtype=dtype, device=device)
    dst_idx = torch.arange(count, device=device)
    moved = count * head_dim * 2
    gather_mapped = moved / time_op(lambda: gather_chunks(pool, src_idx, slots, dst_idx)) / 1e6
    gather_copy = moved / time_op(lambda: gather_chunks_copy(pool, src_idx, slots, dst_idx), repeats=5) / 1e6
    return {"hbm_gbps": hbm, "pinned_h2d_gbps": h2d, "gather_mapped_gbps": gather_mapped, "gather_copy_gbps": gather_copy}


def kernel_section(device, batch: int, hbm_gbps: float, quick: bool) -> dict:
    """One CSA layer step at 128K (10% resident) for `batch` sequences: level-2 top-k and sparse attention
    against their memory floors, and the stock masked eager path (score everything, top-k, attend)."""
    heads, head_dim, index_dim, topk = (4, 64, 32, 64) if quick else (64, 512, 128, 512)
    dtype, window, context = torch.bfloat16, 128, 8192 if quick else 131072
    chunks = context // 4
    resident = chunks // 10
    floor_ms = lambda nbytes: nbytes / hbm_gbps / 1e6  # noqa: E731
    randn = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
    rows = torch.arange(batch, device=device).unsqueeze(1)

    q_index, weights = randn(batch, heads, index_dim), torch.randn(batch, heads, device=device)
    keys_all = randn(batch * chunks, index_dim)  # target layers keep all indexer keys on the device
    cand = torch.stack([torch.randperm(chunks, device=device)[:resident] for _ in range(batch)]) + rows * chunks
    level2 = time_op(lambda: level2_topk(q_index, weights, keys_all, cand, None, topk, index_dim**-0.5))
    q, sinks = randn(batch, heads, head_dim), torch.randn(heads, device=device)
    window_kv, window_bias = randn(batch, window, head_dim), torch.zeros(batch, window, device=device)
    kv_slots = randn(batch * resident, head_dim)  # the hot set's KV table
    picked = torch.stack([torch.randperm(resident, device=device)[:topk] for _ in range(batch)]) + rows * resident
    attention = time_op(lambda: sparse_decode_attention(q, window_kv, window_bias, kv_slots, picked, sinks, head_dim**-0.5))

    kv_all = randn(batch, chunks, head_dim)
    module = SimpleNamespace(num_key_value_groups=heads, sinks=sinks, training=False)
    keys_by_sequence = keys_all.view(batch, chunks, index_dim)

    def stock_step():  # the stock masked eager path: score all, top-k, attend window + all entries with a mask
        scores = (torch.relu(torch.einsum("bhd,btd->bht", q_index.float(), keys_by_sequence.float())) * weights[..., None]).sum(1)
        top = scores.topk(topk, dim=-1).indices
        bias = torch.full((batch, 1, 1, chunks), float("-inf"), device=device, dtype=dtype).scatter_(-1, top[:, None, None], 0.0)
        mask = torch.cat([torch.zeros(batch, 1, 1, window, device=device, dtype=dtype), bias], dim=-1)
        kv = torch.cat([window_kv, kv_all], dim=1).unsqueeze(1)
        return eager_attention_forward(module, q.unsqueeze(2), kv, kv, mask, scaling=head_dim**-0.5)

    stock = time_op(stock_step, repeats=10)
    return {
        "context": context,
        "batch": batch,
        "level2_ms": level2,
        "level2_floor_ms": floor_ms(batch * resident * (index_dim * 2 + 8)),  # candidate keys + slot indices
        "attention_ms": attention,
        "attention_floor_ms": floor_ms(batch * ((window + topk) * head_dim * 2 + topk * 8 + 2 * heads * head_dim * 2)),
        "stock_layer_step_ms": stock,
        "stock_layer_step_floor_ms": floor_ms(batch * chunks * (index_dim + head_dim) * 2),
        "lsa_layer_step_ms": level2 + attention,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="32768,131072,524288,1048576", help="context lengths in tokens")
    parser.add_argument("--batch-sizes", default="1,4", help="each context is measured at each batch size")
    parser.add_argument("--steps", type=int, default=72, help="decode steps per LSA run (one trigger at step tau)")
    parser.add_argument("--stock-steps", type=int, default=12)
    parser.add_argument("--tau", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few steps: a CPU smoke run of this script")
    parser.add_argument("--refresh", action="store_true", help="also LSA with every CSA layer a refresh layer")
    parser.add_argument("--page-recall", action="store_true", help="also LSA recalling whole pages (10%% page budget)")
    parser.add_argument("--page-chunks", type=int, default=64, help="chunks per page for --page-recall (release: 64)")
    parser.add_argument("--fp8-pool", action="store_true", help="also LSA with an FP8 cold pool")
    parser.add_argument("--graph", action="store_true",
                        help="also LSA decoding through its CUDA graph; every run adds the GPU kernel time of a step")
    parser.add_argument("--out", default="decode_long_context.json")
    args = parser.parse_args()
    if args.quick:
        args.contexts, args.steps, args.stock_steps, args.tau = "4096", 12, 4, 8
    batch_sizes = [int(value) for value in args.batch_sizes.split(",")]

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    with torch.device(device):
        model = DeepseekV4ForCausalLM(flash_shaped_config(args.quick)).to(torch.bfloat16).eval()
    csa_layers = [i for i, kind in enumerate(model.config.layer_types) if kind == CSA]
    fm.attach_memory_indexer(model, fm.MemoryIndexerModel.from_backbone(model, layers=csa_layers, num_heads=128, rank=64 if args.quick else 2048))
    results = {"gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "runs": []}
    variants = {}  # run key -> cache options beside the chunk-granular bf16 LSA run
    if args.page_recall:
        variants["lsa_pages"] = {"page_chunks": args.page_chunks, "page_budget": 0.1, "resident_budget": None}
    if args.fp8_pool:
        variants["lsa_fp8"] = {"pool_dtype": "float8_e4m3fn"}
    # Compile every kernel (a trigger and a refresh included) before anything is timed.
    run_lsa(model, 16384, 1, args.tau + 2, args.tau, csa_layers)
    free_memory(device)
    for tokens in [int(value) for value in args.contexts.split(",")]:
        for batch in batch_sizes:
            run = {"context": tokens, "batch": batch}
            run["stock"] = measure(run_stock, model, tokens, batch, args.stock_steps, args.graph)
            free_memory(device)
            run["lsa"] = measure(run_lsa, model, tokens, batch, args.steps, args.tau, None, None, False, args.graph)
            free_memory(device)
            if args.graph:
                run["lsa_graph"] = measure(run_lsa, model, tokens, batch, args.steps, args.tau, None, None, True, True)
                free_memory(device)
            if args.refresh:
                run["lsa_refresh"] = measure(run_lsa, model, tokens, batch, args.steps, args.tau, csa_layers)
                free_memory(device)
            for key, options in variants.items():
                run[key] = measure(run_lsa, model, tokens, batch, args.steps, args.tau, None, options)
                free_memory(device)
            results["runs"].append(run)
            print(json.dumps(summary(run)), flush=True)
    results["bandwidth"] = bandwidths(device, args.quick)
    free_memory(device)
    results["kernels"] = [
        kernel_section(device, batch, results["bandwidth"]["hbm_gbps"], args.quick) for batch in sorted(set(batch_sizes) | {4})
    ]
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=1, default=str)
    print_table(results)


def summary(run: dict) -> dict:
    """A run without the full memory report, for the progress line."""
    return {key: {k: v for k, v in value.items() if k != "report"} if isinstance(value, dict) else value for key, value in run.items()}


def print_table(results):
    gib = lambda value: f"{value / 2**30:.3f}" if isinstance(value, (int, float)) else "n/a"  # noqa: E731
    ms = lambda value: f"{value:.1f}" if isinstance(value, (int, float)) else "-"  # noqa: E731
    # A step's time over the median step: below zero it was within the step-to-step noise (raw value in the JSON).
    extra = lambda value: "<0" if isinstance(value, (int, float)) and value < 0 else ms(value)  # noqa: E731
    print(f"\nGPU: {results['gpu']} (bf16, 2 sliding + 3 CSA + 3 HCA layers; CSA = compressed KV + indexer keys, KV = compressed KV)")
    print("context | batch | CSA GiB stock | CSA GiB LSA | KV ratio | peak GiB stock | peak GiB LSA | ms/tok stock | ms/tok LSA | LSA/stock | trigger / next step, ms over median | recall MiB")
    print("|".join(["---"] * 12))
    for run in results["runs"]:
        stock, lsa = run["stock"], run["lsa"]
        fits, lsa_fits = isinstance(stock, dict), isinstance(lsa, dict)
        both = fits and lsa_fits
        cells = [
            f"{run['context'] // 1024}K", str(run["batch"]),
            gib(stock["csa_gpu_bytes"]) if fits else OOM,
            gib(lsa["csa_gpu_bytes"]) if lsa_fits else OOM,
            f"{lsa['csa_kv_gpu_bytes'] / stock['csa_kv_gpu_bytes']:.3f}" if both else "-",
            gib(stock["peak_bytes"]) if fits else OOM,
            gib(lsa["peak_bytes"]) if lsa_fits else OOM,
            ms(stock["ms_per_token"]) if fits else OOM,
            ms(lsa["ms_per_token"]) if lsa_fits else OOM,
            f"{lsa['ms_per_token'] / stock['ms_per_token']:.2f}" if both else "-",
            f"{extra(lsa['trigger_ms'])} / {extra(lsa['after_trigger_ms'])}" if lsa_fits else "-",
            f"{lsa['recall_bytes'] / 2**20:.1f}" if lsa_fits else "-",
        ]
        print(" | ".join(cells))
    if any("lsa_graph" in run for run in results["runs"]):
        print_graph_table(results["runs"], ms)
    if any("lsa_refresh" in run for run in results["runs"]):
        print_refresh_table(results["runs"], ms)
    if any(key in run for run in results["runs"] for key in VARIANT_NAMES):
        print_variant_table(results["runs"], ms, extra)
    bw = results["bandwidth"]
    print(f"\nHBM copy {bw['hbm_gbps']:.0f} GB/s; pinned H2D {bw['pinned_h2d_gbps']:.1f} GB/s; gather mapped {bw['gather_mapped_gbps']:.1f} GB/s "
          f"({bw['gather_mapped_gbps'] / bw['pinned_h2d_gbps']:.0%} of H2D); gather via staging copy {bw['gather_copy_gbps']:.1f} GB/s")
    context = results["kernels"][0]["context"] // 1024
    print(f"{context}K, one CSA layer step, us (memory floor us): batch | level-2 top-k | sparse attention | stock masked eager | stock / LSA")
    for k in results["kernels"]:
        us = lambda name: f"{k[name + '_ms'] * 1e3:.0f} ({k[name + '_floor_ms'] * 1e3:.1f})"  # noqa: E731
        print(f"{k['batch']} | {us('level2')} | {us('attention')} | {us('stock_layer_step')} | {k['stock_layer_step_ms'] / k['lsa_layer_step_ms']:.1f}x")


VARIANT_NAMES = {"lsa": "chunks, bf16 pool", "lsa_pages": "pages, bf16 pool", "lsa_fp8": "chunks, FP8 pool"}


def print_variant_table(runs, ms, extra):
    """Chunk- against page-granular recall and a bf16 against an FP8 pool: what one recall moves and costs.
    Recall MiB and ranges are those of the decode steps measured (one level-1 trigger)."""
    print("\nRecall granularity and pool dtype (10% budget of chunks or of pages):")
    print("context | batch | LSA run | ms/tok | trigger / next step, ms over median | recall MiB | host ranges | host GiB stored")
    for run in runs:
        for key, name in VARIANT_NAMES.items():
            if key not in run:
                continue
            lsa = run[key]
            fits = isinstance(lsa, dict)
            cells = [
                f"{run['context'] // 1024}K", str(run["batch"]), name,
                ms(lsa["ms_per_token"]) if fits else OOM,
                f"{extra(lsa['trigger_ms'])} / {extra(lsa['after_trigger_ms'])}" if fits else "-",
                f"{lsa['recall_bytes'] / 2**20:.1f}" if fits else "-",
                str(lsa["recall_ranges"]) if fits else "-",
                f"{lsa['host_stored_bytes'] / 2**30:.3f}" if fits else "-",
            ]
            print(" | ".join(cells))


def print_graph_table(runs, ms):
    """Eager against CUDA-graph decode: wall ms per token (mean, triggers included) and GPU kernel ms per step."""
    print("\nDecode through a CUDA graph (wall ms/token, GPU kernel ms/step in parentheses):")
    print("context | batch | stock eager | LSA eager | LSA graph | graph/stock | graph/LSA eager | graph wall/kernels")
    for run in runs:
        stock, eager, graph = run["stock"], run["lsa"], run["lsa_graph"]
        cell = lambda r: f"{ms(r['ms_per_token'])} ({ms(r['kernel_ms_per_step'])})" if isinstance(r, dict) else OOM  # noqa: E731
        fits = isinstance(graph, dict)
        ratio = lambda other: f"{graph['ms_per_token'] / other['ms_per_token']:.2f}" if fits and isinstance(other, dict) else "-"  # noqa: E731
        kernels = graph.get("kernel_ms_per_step") if fits else None
        print(" | ".join([f"{run['context'] // 1024}K", str(run["batch"]), cell(stock), cell(eager), cell(graph), ratio(stock),
                          ratio(eager), f"{graph['ms_per_token'] / kernels:.2f}" if kernels else "-"]))


def print_refresh_table(runs, ms):
    """What refresh on a miss costs: with random weights the native top-k wanders, so this is a worst case."""
    print("\nLSA with every CSA layer a refresh layer (LSAConfig.refresh_layers):")
    print("context | batch | ms/tok stock | ms/tok LSA | ms/tok LSA+refresh | refresh/stock | refreshes/step | fetched MiB/step")
    for run in runs:
        stock, lsa, refresh = run["stock"], run["lsa"], run["lsa_refresh"]
        steps = refresh["steps"] if isinstance(refresh, dict) else None
        cells = [
            f"{run['context'] // 1024}K", str(run["batch"]),
            ms(stock["ms_per_token"]) if isinstance(stock, dict) else OOM,
            ms(lsa["ms_per_token"]) if isinstance(lsa, dict) else OOM,
            ms(refresh["ms_per_token"]) if steps else OOM,
            f"{refresh['ms_per_token'] / stock['ms_per_token']:.2f}" if steps and isinstance(stock, dict) else "-",
            f"{refresh['refreshes'] / steps:.2f}" if steps else "-",
            f"{refresh['recall_bytes'] / steps / 2**20:.2f}" if steps else "-",
        ]
        print(" | ".join(cells))


if __name__ == "__main__":
    main()
