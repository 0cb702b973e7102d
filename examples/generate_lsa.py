"""The README's main job: DeepSeek-V4 answers one question with the stock cache and with LSA, side by side.

By default it asks the backbone and memory indexer shipped in checkpoints/ (a paper-layout DeepSeek-V4 trained
by examples/run_evaluation.sh, its tau-16 indexer by the same recipe) one long-task question (--task, a
--context-token context, the evaluation's examples) and prints the expected answer, the full cache's and LSA's
(threshold --threshold, no budget: as the paper runs it; tau: the indexer's own), and what each cache held.
--backbone and --indexer ask another pair. Both prefill in bounded chunks (fm.enable_bounded_prefill for the stock
cache, the same results up to float rounding): at the default 4096-token context (twice the training length) the
stock model's one-shot prefill alone took 50 s on a 2-core CPU, the bounded one 3 s. The default question is
the first qa_block example of the evaluation's draw (seed 1): 30 s on 2 cores, full writes 129 of its 130 answer
tokens, LSA 61 from 12.6% of the CSA bytes (the first long_chain example is one full gets wrong from token 22).

--tiny runs a tiny random DeepSeek-V4 made in code instead (seconds): with a fresh (untrained) memory indexer at
the default threshold LSA keeps an arbitrary subset and may diverge from stock; with threshold 0 it keeps
everything and must match stock exactly. Both runs are printed, with the memory report.

The first run after an install is slower, for reasons outside this project (it downloads nothing, compiles no
Triton kernel on the CPU, uses no torch.compile). Measured on a 2-core CPU machine with --tiny, warm run about
11 s (5-7 s of it importing torch and transformers' DeepSeek-V4, 3-4 s generating):
- no bytecode cache: Python compiles the ~3,100 modules it imports (torch, sympy, scipy, transformers) on first
  use, +16-22 s. `pip install` writes the cache at install time; `uv pip install` does not unless given
  `--compile-bytecode` (or run `python -m compileall -q` over site-packages once).
- cold disk cache: the run reads about 660 MiB of shared libraries and modules (libtorch_cpu, libtriton): +1 s
  from that machine's disk; at the 5 MiB/s of a slow network disk it would be two minutes.
On a machine shared with other jobs every figure grows with the load.
"""

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import fm_transformers as fm
from fm_transformers.eval.catalog import evaluation_examples
from fm_transformers.eval.long_tasks import LONG_TASK_NAMES
from fm_transformers.eval.vocab import EOS, PAD
from fm_transformers.report import stock_csa_bytes, stock_layer_bytes
from fm_transformers.tiny import tiny_deepseek_v4, tiny_tokenizer

SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints"
SHIPPED_BACKBONE, SHIPPED_INDEXER = SHIPPED / "backbone-bf16", SHIPPED / "indexer-tau16"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny random model made in code instead (seconds)")
    parser.add_argument("--prompt-length", type=int, default=400, help="--tiny: prompt tokens (100 chunks)")
    parser.add_argument("--new-tokens", type=int, default=64, help="--tiny: tokens generated")
    parser.add_argument("--budget", type=float, default=0.25, help="--tiny: resident budget, share of the history")
    parser.add_argument(
        "--tau", type=int, default=None, help="steps per recall (default: the indexer's; 16 with --tiny)"
    )
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--backbone", help="a trained paper-layout backbone (save_pretrained dir; default: shipped)")
    parser.add_argument("--indexer", help="the backbone's memory indexer (save_pretrained dir; with --backbone)")
    parser.add_argument("--task", choices=LONG_TASK_NAMES, default="qa_block", help="the question's task")
    parser.add_argument("--context", type=int, default=4096, help="context tokens (the backbone trained at 2048)")
    parser.add_argument("--answer-tokens", type=int, default=None, help="answer length (default: the task's 130)")
    parser.add_argument("--seed", type=int, default=1, help="the draw the question comes from")
    args = parser.parse_args(argv)
    if (args.backbone is None) != (args.indexer is None):
        parser.error("--backbone and --indexer go together: the backbone's memory indexer decides what LSA keeps")
    if args.tiny and args.backbone is not None:
        parser.error("--tiny makes its own model: leave out --backbone and --indexer")
    if not args.tiny and args.backbone is None:
        missing = [str(path) for path in (SHIPPED_BACKBONE, SHIPPED_INDEXER) if not (path / "config.json").is_file()]
        if missing:
            parser.error(f"the shipped checkpoints are missing ({', '.join(missing)}): run from a clone of the "
                         "repository, pass --backbone and --indexer, or --tiny")
        args.backbone, args.indexer = str(SHIPPED_BACKBONE), str(SHIPPED_INDEXER)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.tiny:
        tiny_demo(args)
    else:
        ask_trained_backbone(args)


def ask_trained_backbone(args) -> None:
    """One long-task question answered by the full cache and by LSA, on the CPU: the answers beside the expected
    one, then the stock cache's bytes and LSA's memory report."""
    model = AutoModelForCausalLM.from_pretrained(args.backbone, dtype=torch.float32).eval()
    indexer = fm.attach_memory_indexer(model, args.indexer)
    fm.enable_bounded_prefill(model)  # the stock cache's prefill in chunks too: 50 s -> 3 s at 4096 on 2 cores
    example = evaluation_examples(args.task, args.context, 1, seed=args.seed, answer_tokens=args.answer_tokens)[0]
    input_ids = torch.tensor([example.input_ids])
    prompt_length, answer_length = input_ids.shape[1], len(example.answer)
    settings = dict(
        attention_mask=torch.ones_like(input_ids), max_new_tokens=answer_length, min_new_tokens=answer_length,
        do_sample=False, pad_token_id=PAD, eos_token_id=EOS, return_dict_in_generate=True,
    )
    tau = args.tau if args.tau is not None else indexer.config.tau or 64
    with torch.no_grad():
        full = model.generate(input_ids, **settings)
        lsa = model.generate(
            input_ids, **settings, cache_implementation="lsa", cache_config={"tau": tau, "threshold": args.threshold}
        )
    print(f"{args.task}: a {prompt_length}-token context, an answer of {answer_length} tokens (token ids)")
    print(f"expected : {shown(example.answer)}")
    answers = {name: output.sequences[0, prompt_length:].tolist() for name, output in (("full", full), ("LSA", lsa))}
    for name, tokens in answers.items():
        print(f"{name:9s}: {shown(tokens, example.answer)}")
    print(f"LSA (tau {tau}, threshold {args.threshold}) writes the full cache's answer token for token: "
          f"{answers['LSA'] == answers['full']}")
    cache = full.past_key_values
    print("stock cache (full)")
    csa, every_layer = stock_csa_bytes(cache, model.config.layer_types), sum(map(stock_layer_bytes, cache.layers))
    print(f"  device CSA entries (compressed KV + index keys) {csa / 2**20:10.3f} MiB")
    print(f"  device all layers                              {every_layer / 2**20:10.3f} MiB")
    print(fm.format_memory_report(lsa.past_key_values.memory_report()))


def shown(tokens: list[int], expected: list[int] | None = None, head: int = 10) -> str:
    """The first `head` ids, and against an expected answer: whole or where it first differs."""
    text = " ".join(map(str, tokens[:head])) + (" ..." if len(tokens) > head else "")
    if expected is None:
        return text
    wrong = [index for index, (token, want) in enumerate(zip(tokens, expected)) if token != want]
    if not wrong:
        return text + "   (exact)"
    return text + f"   (wrong from token {wrong[0]}, {len(wrong)} of {len(expected)} wrong)"


def tiny_demo(args) -> None:
    """A tiny random DeepSeek-V4 and a fresh indexer: LSA keeping everything must equal the stock cache."""
    tau = 16 if args.tau is None else args.tau
    model, tokenizer = tiny_deepseek_v4(seed=0), tiny_tokenizer()
    fm.attach_memory_indexer(model, fm.MemoryIndexerModel.from_backbone(model, layers=[2, 4], num_heads=8, rank=32))
    text = "".join(chr(32 + (7 * i * i + 3 * i) % 95) for i in range(args.prompt_length))
    inputs = tokenizer(text, return_tensors="pt")
    settings = dict(
        max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, return_dict_in_generate=True
    )

    stock = model.generate(**inputs, **settings)
    keep_all = model.generate(
        **inputs, **settings, cache_implementation="lsa", cache_config={"tau": tau, "threshold": 0.0}
    )
    sparse = model.generate(
        **inputs, **settings, cache_implementation="lsa",
        cache_config={
            "tau": tau, "threshold": args.threshold, "resident_budget": args.budget, "recency_chunks": 8,
            "sink_chunks": 2,
        },
    )
    prompt_length = inputs["input_ids"].shape[1]
    decode = lambda out: repr(tokenizer.decode(out.sequences[0, prompt_length:]))  # noqa: E731
    print("a tiny DeepSeek-V4 with random weights and an untrained memory indexer: the tokens are noise; what counts")
    print("is that LSA keeping every chunk equals stock, and what the budget leaves on the device (memory report)")
    print(f"prompt: {prompt_length} tokens, {args.new_tokens} new tokens, tau={tau}")
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
