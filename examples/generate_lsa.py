"""The README's main job: a tiny DeepSeek-V4 made in code generates with LSA and with the stock cache.

Runs on the CPU, offline, in seconds. It attaches a fresh (untrained) memory indexer, so with the default
threshold LSA keeps an arbitrary subset and may diverge from stock; with threshold 0 it keeps everything
and must match stock exactly. Both runs are printed, with the memory report.

The first run after an install is slower, for reasons outside this project (it downloads nothing, compiles no
Triton kernel on the CPU, uses no torch.compile). Measured on a 2-core CPU machine, warm run about 11 s (5-7 s of
it importing torch and transformers' DeepSeek-V4, 3-4 s generating):
- no bytecode cache: Python compiles the ~3,100 modules it imports (torch, sympy, scipy, transformers) on first
  use, +16-22 s. `pip install` writes the cache at install time; `uv pip install` does not unless given
  `--compile-bytecode` (or run `python -m compileall -q` over site-packages once).
- cold disk cache: the run reads about 660 MiB of shared libraries and modules (libtorch_cpu, libtriton): +1 s
  from that machine's disk; at the 5 MiB/s of a slow network disk it would be two minutes.
On a machine shared with other jobs every figure grows with the load.
"""

import argparse

import torch

import fm_transformers as fm
from fm_transformers.tiny import tiny_deepseek_v4, tiny_tokenizer


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-length", type=int, default=400, help="prompt tokens (default 400: 100 compressed chunks)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--tau", type=int, default=16)
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--budget", type=float, default=0.25, help="resident budget as a fraction of the history")
    args = parser.parse_args()

    model, tokenizer = tiny_deepseek_v4(seed=0), tiny_tokenizer()
    fm.attach_memory_indexer(model, fm.MemoryIndexerModel.from_backbone(model, layers=[2, 4], num_heads=8, rank=32))
    text = "".join(chr(32 + (7 * i * i + 3 * i) % 95) for i in range(args.prompt_length))
    inputs = tokenizer(text, return_tensors="pt")
    settings = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, return_dict_in_generate=True)

    stock = model.generate(**inputs, **settings)
    keep_all = model.generate(**inputs, **settings, cache_implementation="lsa", cache_config={"tau": args.tau, "threshold": 0.0})
    sparse = model.generate(
        **inputs, **settings, cache_implementation="lsa",
        cache_config={"tau": args.tau, "threshold": args.threshold, "resident_budget": args.budget, "recency_chunks": 8, "sink_chunks": 2},
    )
    prompt_length = inputs["input_ids"].shape[1]
    decode = lambda out: repr(tokenizer.decode(out.sequences[0, prompt_length:]))  # noqa: E731
    print("a tiny DeepSeek-V4 with random weights and an untrained memory indexer: the tokens are noise; what counts")
    print("is that LSA keeping every chunk equals stock, and what the budget leaves on the device (memory report)")
    print(f"prompt: {prompt_length} tokens, {args.new_tokens} new tokens, tau={args.tau}")
    print(f"stock cache             : {decode(stock)}")
    print(f"LSA, threshold 0        : {decode(keep_all)}")
    print(f"LSA, threshold {args.threshold}, budget {args.budget:.0%}: {decode(sparse)}")
    identical = torch.equal(keep_all.sequences, stock.sequences)
    print(f"LSA with threshold 0 equals stock token for token: {identical}")
    print(fm.format_memory_report(sparse.past_key_values.memory_report()))
    if not identical:
        raise SystemExit("LSA with nothing dropped differs from the stock model")


if __name__ == "__main__":
    main()
