"""Does an FP8 cold pool change what the model says? Keep-all LSA decoding from an FP8 pool against the stock cache.

The decode benchmark's model (decode_long_context.py: V4-Flash attention sizes, 2 sliding + 3 CSA + 3 HCA layers,
random bf16 weights) and its synthesized context (every cache receives the same random entries). Stock decodes
--tokens tokens greedily; each LSA run (KeepAllPolicy) is fed the same tokens (teacher forcing, so one early
disagreement does not make every later step disagree). Before decoding, every CSA layer of the LSA cache drops its
device copy of the context and recalls every chunk from its cold pool, so attention reads the context only as it
came back from the pool (compressed KV and the indexer keys; chunks made while decoding stay exact on the device).
The bf16 pool is an exact copy of the stock entries: its row shows what the sparse decode path alone changes, the
FP8 row what the pool's quantization adds.

Per context and pool dtype: top-1 agreement (argmax of LSA's logits = stock's token), mean and max |logit error|
against the stock logits' standard deviation and the median gap between stock's best and second-best logit (with
random weights the logits are nearly flat, so a small error flips the top-1 more easily than in a trained model),
host bytes stored and recall bytes. Prints a table; writes JSON.
`--quick` runs tiny sizes (a CPU smoke run).
"""

import argparse
import json

import torch
from decode_long_context import fill_context, flash_shaped_config, free_memory
from transformers import DeepseekV4ForCausalLM, DynamicCache

import fm_transformers as fm

POOLS = ("bfloat16", "float8_e4m3fn")


def teacher_forced_logits(model, cache, context: int, first_token: int, tokens: list[int] | None, steps: int):
    """(steps, vocab) fp32 logits of `steps` single-token forwards after a `context`-long cache, fed
    first_token and then `tokens` (None: greedy, each step's argmax), and the tokens fed after the first."""
    device, fed, logits = model.device, [], []
    token = first_token
    with torch.no_grad():
        for step in range(steps):
            out = model(
                input_ids=torch.tensor([[token]], device=device),
                position_ids=torch.tensor([[context + step]], device=device),
                past_key_values=cache,
                use_cache=True,
            )
            logits.append(out.logits[0, -1].float())
            token = int(logits[-1].argmax()) if tokens is None else tokens[step]
            fed.append(token)
    return torch.stack(logits), fed


def recall_everything_from_the_pool(cache) -> None:
    """Every CSA layer drops its device copy of the history, then recalls all of it from its cold pool."""
    for layer in cache.lookahead_layers():
        everything = [torch.arange(layer.num_chunks, device=layer.kv_table().device)]
        layer.recall([everything[0][:0]], layer.num_chunks)
        layer.recall(everything, layer.num_chunks)


def measure(model, context: int, steps: int) -> dict:
    """Stock greedy tokens and logits, then keep-all LSA from each pool dtype teacher-forced on them."""
    first_token = 7
    stock_cache = DynamicCache(config=model.config)
    fill_context(model, stock_cache, context, 1, seed=context)
    stock, tokens = teacher_forced_logits(model, stock_cache, context, first_token, None, steps)
    best_two = stock.topk(2, dim=-1).values
    margin = (best_two[:, 0] - best_two[:, 1]).median().item()
    del stock_cache
    free_memory(model.device)
    rows = {}
    for pool_dtype in POOLS:
        config = {"tau": 64, "recency_chunks": 0, "sink_chunks": 0, "pool_dtype": pool_dtype}
        cache = fm.OffloadedLookaheadCache(model, config, policy=fm.KeepAllPolicy())
        fill_context(model, cache, context, 1, seed=context)
        recall_everything_from_the_pool(cache)
        lsa, _ = teacher_forced_logits(model, cache, context, first_token, tokens, steps)
        error = (lsa - stock).abs()
        report = cache.memory_report()
        rows[pool_dtype] = {
            "top1_agreement": (lsa.argmax(-1) == stock.argmax(-1)).float().mean().item(),
            "mean_abs_logit_error": error.mean().item(),
            "max_abs_logit_error": error.max().item(),
            "stock_logit_std": stock.std().item(),
            "stock_top1_margin_median": margin,
            "host_stored_bytes": report["host"]["csa_kv_stored"] + report["host"]["csa_index_keys_stored"],
            "recall_bytes": report["bytes_fetched"],
            "chunks_fetched": report["chunks_fetched"],
        }
        del cache
        free_memory(model.device)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="16384,65536,131072", help="context lengths in tokens")
    parser.add_argument("--tokens", type=int, default=256, help="decode steps compared per context")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few tokens: a CPU smoke run of this script")
    parser.add_argument("--out", default="fp8_pool_agreement.json")
    args = parser.parse_args()
    if args.quick:
        args.contexts, args.tokens = "2048", 8
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    with torch.device(device):
        model = DeepseekV4ForCausalLM(flash_shaped_config(args.quick)).to(torch.bfloat16).eval()
    results = {"gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "tokens": args.tokens, "runs": []}
    for context in [int(value) for value in args.contexts.split(",")]:
        results["runs"].append({"context": context, "pools": measure(model, context, args.tokens)})
        print(json.dumps(results["runs"][-1]), flush=True)
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=1)
    print_table(results)


def print_table(results):
    print(f"\nGPU: {results['gpu']}; keep-all LSA against stock, {results['tokens']} teacher-forced tokens, bf16 model")
    print("context | pool | top-1 agreement | mean abs logit error | max abs logit error | stock logit std | stock top-1 margin | host MiB stored | recall MiB")
    print("|".join(["---"] * 9))
    for run in results["runs"]:
        for pool, row in run["pools"].items():
            cells = [
                f"{run['context'] // 1024}K", pool, f"{row['top1_agreement']:.3f}",
                f"{row['mean_abs_logit_error']:.4f}", f"{row['max_abs_logit_error']:.3f}", f"{row['stock_logit_std']:.3f}",
                f"{row['stock_top1_margin_median']:.3f}",
                f"{row['host_stored_bytes'] / 2**20:.1f}", f"{row['recall_bytes'] / 2**20:.1f}",
            ]
            print(" | ".join(cells))


if __name__ == "__main__":
    main()
