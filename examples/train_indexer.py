"""Train a memory indexer end to end on the tiny DeepSeek-V4, on the CPU, in a few minutes, offline.

    python examples/train_indexer.py [--workdir runs/train_indexer]

The same steps with the command line (a real backbone only changes --model and the sizes):

    fm-indexer dump-labels --model tiny --documents train.jsonl --output labels/train --layers 4 6 7 --tau 16
    fm-indexer dump-labels --model tiny --documents heldout.jsonl --output labels/heldout --layers 4 6 7 --tau 16
    fm-indexer train --data labels/train --eval-data labels/heldout --output indexer --num-heads 16 --rank 128
    fm-indexer eval --indexer indexer --data labels/heldout
    fm-indexer push --indexer indexer --repo-id you/fm-indexer-tiny --local-dir repo

The documents are synthetic "needles in filler" (fm_transformers.training.synthetic): what the tiny random
backbone's native indexer picks depends on their content, so there is something real to learn. The script
prints the held-out metrics next to a recency selector that keeps exactly as many (newest) chunks, then loads
the saved indexer onto the backbone with AutoLSAModelForCausalLM, generates with cache_implementation="lsa" from
a held-out document and prints the cache's memory report.
"""

import argparse
import logging
import shutil
from pathlib import Path

import torch

import fm_transformers
from fm_transformers.tiny import tiny_deepseek_v4
from fm_transformers.training import DumpConfig, LabelConfig, LabelShards, TrainConfig, dump_labels, evaluate, train
from fm_transformers.training.evaluate import format_metrics
from fm_transformers.training.documents import read_jsonl
from fm_transformers.training.synthetic import needle_documents, write_jsonl

TARGET_LAYERS = (4, 6, 7)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="runs/train_indexer", help="where documents, labels and the indexer go")
    parser.add_argument("--train-docs", type=int, default=48)
    parser.add_argument("--heldout-docs", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=512, help="tokens per document")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens to generate with the trained indexer")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    workdir = Path(args.workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    backbone = tiny_deepseek_v4(seed=0)
    dump = DumpConfig(target_layers=TARGET_LAYERS, labels=LabelConfig(tau=16), chunk_size=256, docs_per_shard=8)
    for split, count, seed in (("train", args.train_docs, 0), ("heldout", args.heldout_docs, 1000)):
        documents = write_jsonl(workdir / f"{split}.jsonl", needle_documents(count, args.tokens, seed=seed))
        dump_labels(backbone, read_jsonl(documents), workdir / "labels" / split, dump, "fm_transformers.tiny(seed=0)")

    config = TrainConfig(
        data=str(workdir / "labels" / "train"),
        eval_data=str(workdir / "labels" / "heldout"),
        output_dir=str(workdir / "indexer"),
        num_heads=16,
        rank=128,
        max_steps=args.steps,
        batch_size=32,
        learning_rate=3e-3,
        cpu=True,
    )
    train(config)

    model = fm_transformers.AutoLSAModelForCausalLM.from_pretrained(workdir / "indexer", base_model=backbone)
    metrics = evaluate(fm_transformers.attached_memory_indexer(model), LabelShards(workdir / "labels" / "heldout"))
    print("\n" + format_metrics(metrics))

    prompt = torch.tensor([read_jsonl(workdir / "heldout.jsonl")[0].input_ids])  # (1, tokens)
    out = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
        do_sample=False, return_dict_in_generate=True, cache_implementation="lsa",
        cache_config={"tau": 16, "threshold": 0.5, "recency_chunks": 8, "sink_chunks": 2},
    )
    print(f"\ngenerated {out.sequences.shape[1] - prompt.shape[1]} tokens after a {prompt.shape[1]}-token held-out document")
    print(fm_transformers.format_memory_report(out.past_key_values.memory_report()))


if __name__ == "__main__":
    main()
