#!/usr/bin/env bash
# The whole evaluation, fixed seeds: train the evaluation backbone (one GPU, about 15 minutes on an H100), train
# its memory indexer with the project's pipeline (about 3 minutes, CPU or GPU), then compare Full / LSA /
# LSA + refresh / refresh only / recency / random at 512 to 4096 tokens (20 examples per task and length).
# Usage: bash examples/run_evaluation.sh [WORKDIR]   (default runs/evaluation)
set -euo pipefail
work=${1:-runs/evaluation}
python examples/train_eval_backbone.py --device cuda --output-dir "$work/backbone" --export-bf16 "$work/backbone-bf16" \
    --eval-lengths 512,1024 --eval-examples 20
python examples/train_eval_indexer.py --backbone "$work/backbone-bf16" --workdir "$work/indexer"
python examples/compare_methods.py --backbone "$work/backbone-bf16" --indexer "$work/indexer/indexer" \
    --out "$work/compare.json" --plot "$work/compare.png"
