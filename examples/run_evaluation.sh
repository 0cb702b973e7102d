#!/usr/bin/env bash
# The whole evaluation, fixed seeds: train the evaluation backbone in two stages (one GPU, about 15 + 5 minutes on
# an H100 or H200), train its memory indexer with the project's pipeline (about 5 minutes, CPU or GPU), then compare
# Full / LSA / LSA + refresh / refresh only / recency / random at 512 to 4096 tokens (20 examples per task and length).
# Usage: bash examples/run_evaluation.sh [WORKDIR]   (default runs/evaluation)
set -euo pipefail
work=${1:-runs/evaluation}
# Stage 1: from scratch, a length curriculum up to 512 tokens with a dense-CSA warm-up.
python examples/train_eval_backbone.py --device cuda --output-dir "$work/backbone" --export-bf16 "$work/backbone-bf16" \
    --eval-lengths 512,1024 --eval-examples 20
# Stage 2: from stage 1's bf16 export, every context at the training length, lr 3e-4, the two weakest tasks twice
# as often.
python examples/train_eval_backbone.py --device cuda --init-from "$work/backbone-bf16" --steps 1500 --dense-steps 0 \
    --ramp-steps 0 --min-length 512 --lr 3e-4 --extra-tasks variable_tracking,common_words \
    --output-dir "$work/backbone2" --export-bf16 "$work/backbone2-bf16" --eval-lengths 512,1024 --eval-examples 60
python examples/train_eval_indexer.py --backbone "$work/backbone2-bf16" --workdir "$work/indexer"
python examples/compare_methods.py --backbone "$work/backbone2-bf16" --indexer "$work/indexer/indexer" \
    --out "$work/compare.json" --plot "$work/compare.png"
