"""Evaluation on synthetic long-context tasks: RULER-style generators (tasks.py) and long-decoding ones
(long_tasks.py, qa_documents.py), small DeepSeek-V4 backbones trained on them (backbone.py, the paper's layout
checked in paper_layout.py; native indexer distilled from the attention), the memory indexer's data (indexer_data,
dump_blocks, label_selection, gate), and the comparison of full cache, LSA and its baselines (methods, matched,
oracle, comparison, measures, statistics, summary, tuning). docs/evaluation.md says how they fit together."""

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
