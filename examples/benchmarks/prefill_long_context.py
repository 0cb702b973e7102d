"""Long prefill on one GPU through `model.generate`: the stock cache and LSA side by side, in one run.

A real prefill, not a synthesized one: random token ids go through `model.generate(ids, prefill_chunk_size=...,
max_new_tokens=...)`, the stock way (DynamicCache, transformers' eager attention) and with
`cache_implementation="lsa"` (the bounded prefill of fm_transformers.prefill, then decode on the resident
set). The model has V4-Flash attention sizes (64 heads x 512, indexer 64 x 128, top-k 512, window 128, CSA
rate 4, HCA rate 128) with random bf16 weights: `--layout small` is 2 sliding + 3 CSA + 3 HCA layers with 8
small experts, `--layout flash43` the V4-Flash layer layout (2 sliding, then CSA and HCA alternating: 21 CSA,
20 HCA). LSA runs a fresh (untrained) memory indexer on the three deepest CSA layers and a 10% budget.

Per (context, batch, method), in a subprocess with a timeout (an out-of-memory costs one row): prefill seconds
(prompt in, first token out), prefill peak GiB (allocator, from before generate to the first token), decode
ms/token (median step) and decode peak GiB, and for LSA the seconds spent in the native indexer's top-k and
in the prefill attention kernels (CUDA events around each call), which tell what grows with the context.
Stock rows past the first context that ran out of memory are not run (they would only run out later).
Methods: `stock` (DynamicCache, eager decode), `lsa-eager` (LSA with cache_config cuda_graph=False) and `lsa`
(LSA decoding through its CUDA graph, the default on a GPU). With `--kernel-time` the last `--profile-steps`
decode steps run under torch.profiler and the row adds the GPU kernel time per step beside the wall time
(the median of the steps before them, unprofiled). `--bounded-stock-prefill` gives the stock rows the same
bounded prefill (fm_transformers.enable_bounded_prefill) so a long stock prompt fits: its decode stays stock.
Prints a short table last; writes JSON (`--out`) and a PNG of peak memory and prefill time against the
context (`--plot`). `--quick` runs tiny sizes on the CPU (a smoke run).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CSA, HCA, SLIDING = "compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"
GIB = 2**30


def layer_types(layout: str) -> list[str]:
    if layout == "flash43":
        return [SLIDING, SLIDING] + [CSA if index % 2 == 0 else HCA for index in range(41)]
    return [SLIDING, SLIDING, CSA, HCA, CSA, HCA, CSA, HCA]


def build_model(layout: str, quick: bool, device):
    import torch
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    heads, head_dim, hidden = (4, 64, 128) if quick else (64, 512, 4096)
    types = layer_types(layout)
    config = DeepseekV4Config(
        vocab_size=1024, hidden_size=hidden, moe_intermediate_size=256, num_hidden_layers=len(types), layer_types=types,
        num_attention_heads=heads, head_dim=head_dim, q_lora_rank=hidden // 4, o_groups=4 if quick else 8,
        o_lora_rank=hidden // 4, index_n_heads=8 if quick else 64, index_head_dim=32 if quick else 128,
        index_topk=64 if quick else 512, sliding_window=128, n_routed_experts=8, num_experts_per_tok=2,
        max_position_embeddings=1 << 21, rope_parameters={"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 65536},
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = DeepseekV4ForCausalLM(config).to(torch.bfloat16 if device.type == "cuda" else torch.float32)
    return model.eval()


class StepClock:
    """A generate streamer that timestamps the prompt (before prefill), the first token and every decode step,
    and reads the allocator's peak at the first token (the prefill peak) and at the end (the decode peak).
    From decode step `profile_from` on (if given) the steps run under torch.profiler (CUDA kernels only)."""

    def __init__(self, torch, device, profile_from: int | None = None):
        self.torch, self.device, self.times, self.prefill_peak = torch, device, [], 0
        self.profile_from, self.profiler, self.profiled_steps = profile_from, None, 0

    def put(self, value):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        if len(self.times) == 2 and self.device.type == "cuda":
            self.prefill_peak = self.torch.cuda.max_memory_allocated()
            self.torch.cuda.reset_peak_memory_stats()
        if self.profiler is not None:
            self.profiled_steps += 1
        elif self.profile_from is not None and len(self.times) == 2 + self.profile_from:
            self.profiler = self.torch.profiler.profile(activities=[self.torch.profiler.ProfilerActivity.CUDA])
            self.profiler.start()

    def end(self):
        if self.profiler is not None:
            self.torch.cuda.synchronize()
            self.profiler.stop()

    def unprofiled_steps(self) -> list[float]:
        stop = len(self.times) if self.profiler is None else 2 + self.profile_from
        return [b - a for a, b in zip(self.times[1:stop], self.times[2:stop])]

    def kernel_ms_per_step(self) -> float | None:
        """GPU kernel time per profiled decode step: the kernels' device time summed, over the steps."""
        if self.profiler is None or not self.profiled_steps:
            return None
        total_us = sum(event.self_device_time_total for event in self.profiler.key_averages())
        return total_us / 1000 / self.profiled_steps


def timed_kernels(torch, module, names, totals):
    """Wrap module-level functions so each call's GPU time adds to totals[name] (CUDA events)."""
    for name in names:
        original = getattr(module, name)

        def wrapper(*args, _original=original, _name=name, **kwargs):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = _original(*args, **kwargs)
            stop.record()
            stop.synchronize()
            totals[_name] = totals.get(_name, 0.0) + start.elapsed_time(stop) / 1000
            return result

        setattr(module, name, wrapper)


def run_row(args) -> dict:
    """One (context, batch, method) in this process; the parent runs it in a subprocess."""
    import torch

    import fm_transformers as fm
    from fm_transformers import prefill
    from fm_transformers.layout import csa_layers

    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    model = build_model(args.layout, args.quick, device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0,
                  prefill_chunk_size=args.chunk)
    totals = {}
    if args.method == "stock" and args.bounded_stock_prefill:
        fm.enable_bounded_prefill(model)
    if args.method.startswith("lsa"):
        layers = csa_layers(model.config)[-3:]
        heads, rank = (8, 32) if args.quick else (64, 512)
        fm.attach_memory_indexer(model, fm.MemoryIndexerModel.from_backbone(model, layers=layers, num_heads=heads, rank=rank))
        kwargs.update(cache_implementation="lsa", cache_config={"tau": 64, "resident_budget": 0.1, "prefill_progress": False,
                                                                 "cuda_graph": args.method == "lsa"})
        if device.type == "cuda":
            timed_kernels(torch, prefill, ["indexer_topk", "sparse_prefill_attention"], totals)
    generator = torch.Generator().manual_seed(args.context)
    ids = torch.randint(4, 1024, (args.batch, args.context), generator=generator).to(device)
    profile_from = args.new_tokens - 1 - args.profile_steps if args.kernel_time and device.type == "cuda" else None
    clock = StepClock(torch, device, profile_from)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        out = model.generate(ids, streamer=clock, return_dict_in_generate=True, **kwargs)
    steps = clock.unprofiled_steps()
    row = {
        "status": "ok", "weights_gib": weights / GIB, "prefill_s": clock.times[1] - clock.times[0],
        "prefill_peak_gib": clock.prefill_peak / GIB, "decode_ms": 1000 * statistics.median(steps) if steps else None,
        "decode_peak_gib": torch.cuda.max_memory_allocated() / GIB if device.type == "cuda" else None,
        "indexer_topk_s": totals.get("indexer_topk"), "prefill_attention_s": totals.get("sparse_prefill_attention"),
        "decode_kernel_ms": clock.kernel_ms_per_step(),
    }
    if args.method.startswith("lsa"):
        report = out.past_key_values.memory_report()
        row.update(csa_device_ratio=report["csa_device_ratio"], recalls=report["recalls"])
    return row


def agreement(args) -> dict:
    """bf16 on the GPU: the stock eager prefill and LSA keep-all (KeepAllPolicy: nothing dropped) on the same
    prompt: cosine of the prompt's last-token logits and how many of the greedy tokens agree."""
    import torch

    import fm_transformers as fm

    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    model = build_model(args.layout, args.quick, device)
    ids = torch.randint(4, 1024, (1, args.context), generator=torch.Generator().manual_seed(1)).to(device)
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0,
                  prefill_chunk_size=args.chunk, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        stock = model.generate(ids, **kwargs)
        cache = fm.OffloadedLookaheadCache(model, {"tau": 64, "prefill_progress": False}, policy=fm.KeepAllPolicy())
        lsa = model.generate(ids, past_key_values=cache, **kwargs)
    first = torch.nn.functional.cosine_similarity(stock.logits[0].float(), lsa.logits[0].float(), dim=-1).item()
    new = ids.shape[1]
    same = (stock.sequences[0, new:] == lsa.sequences[0, new:]).int()
    leading = int(same.cumprod(0).sum())
    margins = [float(step.float().topk(2, dim=-1).values[0].diff().abs()) for step in stock.logits]
    return {"context": args.context, "last_token_logits_cosine": first, "greedy_tokens_equal": int(same.sum()),
            "leading_tokens_equal": leading, "tokens": args.new_tokens,
            "stock_top2_margin_at_first_difference": margins[leading] if leading < len(margins) else None,
            "largest_logit_difference_before_it": max(float((a.float() - b.float()).abs().max()) for a, b in
                                                      zip(stock.logits[: leading + 1], lsa.logits[: leading + 1])),
            "median_stock_top2_margin": sorted(margins)[len(margins) // 2]}


def graph_agreement(args) -> dict:
    """bf16 on the GPU: LSA decoding through its CUDA graph against the same fixed-shape step run eagerly
    (same kernels, same inputs), greedy, --new-tokens steps at --contexts[0]: tokens and triggers."""
    import torch

    import fm_transformers as fm
    from fm_transformers.decode_graph import DecodeGraph
    from fm_transformers.layout import csa_layers

    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    model = build_model(args.layout, args.quick, device)
    heads, rank = (8, 32) if args.quick else (64, 512)
    fm.attach_memory_indexer(model, fm.MemoryIndexerModel.from_backbone(model, layers=csa_layers(model.config)[-3:], num_heads=heads, rank=rank))
    ids = torch.randint(4, 1024, (1, args.context), generator=torch.Generator().manual_seed(2)).to(device)
    runs = {}
    for capture in (False, True):
        cache = fm.OffloadedLookaheadCache(model, {"tau": 16, "resident_budget": 0.1, "prefill_progress": False})
        cache.decode_graph = DecodeGraph(model, cache, capture=capture and device.type == "cuda")
        with torch.no_grad():
            out = model.generate(ids, past_key_values=cache, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                 do_sample=False, pad_token_id=0, prefill_chunk_size=args.chunk, return_dict_in_generate=True)
        runs[capture] = (out.sequences[0, ids.shape[1]:], cache.trigger_count, cache.decode_graph.replays)
    same = (runs[False][0] == runs[True][0]).int()
    return {"context": args.context, "tokens": args.new_tokens, "greedy_tokens_equal": int(same.sum()),
            "leading_tokens_equal": int(same.cumprod(0).sum()), "triggers": runs[True][1], "replays": runs[True][2]}


def run_in_subprocess(argv, timeout) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        done = subprocess.run([sys.executable, __file__, *argv, "--row"], capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout {timeout}s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("ROW "):
            return json.loads(line[4:])
    text = done.stderr
    if "OutOfMemoryError" in text or "out of memory" in text:
        allocation = text[text.find("Tried to allocate") :].split(" GiB")[0] + " GiB" if "Tried to allocate" in text else ""
        return {"status": "OOM", "detail": allocation}
    return {"status": "error", "detail": text.strip().splitlines()[-1] if text.strip() else "no output"}


def parse_context(text: str) -> int:
    text = text.upper()
    return int(text[:-1]) * (1 << 10 if text.endswith("K") else 1 << 20) if text[-1] in "KM" else int(text)


def print_table(rows):
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    print(f"{'layout':8s} {'context':>8s} {'batch':>5s} {'method':9s} {'prefill s':>10s} {'peak GiB':>9s} "
          f"{'decode ms':>9s} {'kernel ms':>9s} {'topk s':>7s} {'attn s':>7s} {'status':s}")
    for row in rows:
        print(f"{row['layout']:8s} {row['context']:8d} {row['batch']:5d} {row['method']:9s} {fmt(row.get('prefill_s'), '10.1f')} "
              f"{fmt(row.get('prefill_peak_gib'), '9.1f')} {fmt(row.get('decode_ms'), '9.1f')} {fmt(row.get('decode_kernel_ms'), '9.1f')} "
              f"{fmt(row.get('indexer_topk_s'), '7.1f')} {fmt(row.get('prefill_attention_s'), '7.1f')} {row['status']}")
    for row in rows:
        stock = next((r for r in rows if r["method"] == "stock" and r["status"] == "ok" and
                      (r["layout"], r["context"], r["batch"]) == (row["layout"], row["context"], row["batch"])), None)
        if row["method"] == "lsa" and row["status"] == "ok" and stock:
            ratio = lambda key: row[key] / stock[key] if stock[key] else float("nan")  # noqa: E731
            print(f"LSA/stock {row['layout']} {row['context']} x{row['batch']}: prefill time {ratio('prefill_s'):.2f}x, "
                  f"prefill peak {ratio('prefill_peak_gib'):.2f}x, decode ms/token {ratio('decode_ms'):.2f}x")
    for row in rows:
        eager = next((r for r in rows if r["method"] == "lsa-eager" and r["status"] == "ok" and
                      (r["layout"], r["context"], r["batch"]) == (row["layout"], row["context"], row["batch"])), None)
        if row["method"] == "lsa" and row["status"] == "ok" and eager and row.get("decode_kernel_ms"):
            print(f"LSA graph {row['layout']} {row['context']} x{row['batch']}: {row['decode_ms'] / eager['decode_ms']:.2f}x "
                  f"LSA eager ms/token, wall {row['decode_ms'] / row['decode_kernel_ms']:.2f}x its GPU kernel time")


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (memory, seconds) = plt.subplots(1, 2, figsize=(11, 4))
    for (layout, batch, method) in sorted({(r["layout"], r["batch"], r["method"]) for r in rows}):
        done = sorted((r for r in rows if (r["layout"], r["batch"], r["method"]) == (layout, batch, method) and r["status"] == "ok"),
                      key=lambda r: r["context"])
        if done:
            label = f"{method} {layout} x{batch}"
            memory.plot([r["context"] for r in done], [r["prefill_peak_gib"] for r in done], "o-", label=label)
            seconds.plot([r["context"] for r in done], [r["prefill_s"] for r in done], "o-", label=label)
    for axis, title in ((memory, "prefill peak GiB (allocator)"), (seconds, "prefill seconds")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("context tokens")
        axis.set_title(title)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--contexts", nargs="+", default=["32K", "128K", "256K", "512K", "1M"], help="prompt lengths (K = 1024)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1], help="batch sizes")
    parser.add_argument("--methods", nargs="+", default=["stock", "lsa"], choices=["stock", "lsa-eager", "lsa"])
    parser.add_argument("--bounded-stock-prefill", action="store_true", help="stock rows prefill like LSA (decode stays stock)")
    parser.add_argument("--kernel-time", action="store_true", help="profile the last decode steps: GPU kernel ms per step")
    parser.add_argument("--profile-steps", type=int, default=8, help="decode steps profiled with --kernel-time")
    parser.add_argument("--layout", default="small", choices=["small", "flash43"])
    parser.add_argument("--chunk", type=int, default=4096, help="prefill_chunk_size passed to generate")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens decoded after the prefill")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per row")
    parser.add_argument("--out", default="prefill_long_context.json")
    parser.add_argument("--plot", default=None, help="PNG path for the plot (none by default)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes on the CPU (smoke run)")
    parser.add_argument("--agreement", action="store_true", help="only compare stock and LSA keep-all (bf16) at --contexts[0]")
    parser.add_argument("--graph-agreement", action="store_true",
                        help="only compare LSA through its CUDA graph with the same step run eagerly, at --contexts[0]")
    parser.add_argument("--row", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--context", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        print("ROW " + json.dumps(run_row(args)), flush=True)
        return
    if args.agreement or args.graph_agreement:
        args.context = parse_context(args.contexts[0])
        print(json.dumps((graph_agreement if args.graph_agreement else agreement)(args)), flush=True)
        return
    rows, stock_oom = [], set()
    for batch in args.batches:
        for context in map(parse_context, args.contexts):
            for method in args.methods:
                row = {"layout": args.layout, "context": context, "batch": batch, "method": method}
                if method == "stock" and batch in stock_oom:
                    row["status"] = "not run (OOM at a shorter context)"
                else:
                    argv = ["--layout", args.layout, "--chunk", str(args.chunk), "--new-tokens", str(args.new_tokens),
                            "--context", str(context), "--batch", str(batch), "--method", method,
                            "--profile-steps", str(args.profile_steps)]
                    argv += [flag for flag, on in (("--quick", args.quick), ("--kernel-time", args.kernel_time),
                                                   ("--bounded-stock-prefill", args.bounded_stock_prefill)) if on]
                    row.update(run_in_subprocess(argv, args.timeout))
                    if method == "stock" and row["status"] == "OOM":
                        stock_oom.add(batch)
                rows.append(row)
                print(json.dumps(row), flush=True)
    with open(args.out, "w") as handle:
        json.dump({"rows": rows, "args": vars(args)}, handle, indent=2)
    if args.plot:
        plot(rows, args.plot)
    print_table(rows)


if __name__ == "__main__":
    main()
