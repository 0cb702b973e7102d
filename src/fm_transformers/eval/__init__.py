"""Evaluation on synthetic long-context tasks: RULER-style generators, a small DeepSeek-V4 trained on them
(its native indexer distilled from its attention), and exact-match accuracy through a pluggable generation."""

from .backbone import BACKBONE_SIZES, build_eval_backbone, eval_backbone_config
from .backbone_training import (
    TrainingConfig,
    TrainingRun,
    evaluate_backbone,
    train_backbone,
)
from .compare import evaluate_accuracy, format_accuracy_table, full_cache_generate
from .distillation import IndexerDistillation, indexer_kl, set_dense_csa
from .tasks import (
    TASK_NAMES,
    TASKS,
    Example,
    accuracy,
    exact_match,
    make_example,
    make_examples,
)

__all__ = [
    "BACKBONE_SIZES",
    "TASKS",
    "TASK_NAMES",
    "Example",
    "IndexerDistillation",
    "TrainingConfig",
    "TrainingRun",
    "accuracy",
    "build_eval_backbone",
    "eval_backbone_config",
    "evaluate_accuracy",
    "evaluate_backbone",
    "exact_match",
    "format_accuracy_table",
    "full_cache_generate",
    "indexer_kl",
    "make_example",
    "make_examples",
    "set_dense_csa",
    "train_backbone",
]
