#!/usr/bin/env bash
# The whole evaluation on one GPU (about 6 minutes on an H100), fixed seeds: train the evaluation backbone,
# train its memory indexer with the project's pipeline, then compare Full / LSA / recency / random.
# Usage: bash examples/run_evaluation.sh [WORKDIR]   (default runs/evaluation)
set -euo pipefail
work=${1:-runs/evaluation}
python examples/train_eval_backbone.py --device cuda --output-dir "$work/backbone" --export-bf16 "$work/backbone-bf16" \
    --eval-lengths 512,1024 --eval-examples 20
python examples/train_eval_indexer.py --backbone "$work/backbone-bf16" --workdir "$work/indexer" --candidate-layers 2 \
    --train-docs 200 --heldout-docs 30 --steps 400
python examples/compare_methods.py --backbone "$work/backbone-bf16" --indexer "$work/indexer/indexer" \
    --lengths 1024,2048 --examples 10 --out "$work/compare.json" --plot "$work/compare.png"
