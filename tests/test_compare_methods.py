"""The Full / LSA / recency / random comparison runs end to end on the CPU at short context (the CI version)."""

import pytest

import fm_transformers as fm
from fm_transformers.eval import TASK_NAMES, build_eval_backbone, eval_backbone_config, evaluate_accuracy, make_examples
from fm_transformers.eval.methods import comparison_methods


@pytest.fixture(scope="module")
def backbone_and_indexer():
    model = build_eval_backbone(eval_backbone_config("smoke"), seed=0).eval()
    return model, fm.MemoryIndexerModel.from_backbone(model, layers=[2, 4], num_heads=4, rank=16)


def run(model, indexer, config, length=128):
    fm.attach_memory_indexer(model, indexer)
    examples = [example for task in TASK_NAMES[:2] for example in make_examples(task, length, 1, seed=1)]
    methods = comparison_methods(indexer, config)
    return {method.name: (evaluate_accuracy(model, examples, method.generate, progress=False), method.mean_csa_bytes()) for method in methods}


def test_lsa_keeping_everything_scores_as_full(backbone_and_indexer):
    results = run(*backbone_and_indexer, {"tau": 4, "threshold": 0.0})
    assert results["lsa"][0] == results["full"][0]


def test_budgeted_methods_hold_less_than_full_and_the_same_budget(backbone_and_indexer):
    results = run(*backbone_and_indexer, {"tau": 4, "threshold": 0.5, "resident_budget": 0.15, "recency_chunks": 2, "sink_chunks": 1})
    full_bytes = results["full"][1]
    assert all(0 < results[name][1] < full_bytes for name in ("lsa", "recency", "random"))
    assert results["recency"][1] == results["random"][1]
