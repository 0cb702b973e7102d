import torch

from fm_transformers.eval import (
    evaluate_accuracy,
    format_accuracy_table,
    full_cache_generate,
    make_examples,
)
from fm_transformers.eval.tasks import TASK_NAMES


def examples_of_every_task(length=96, count=3):
    return [example for task in TASK_NAMES for example in make_examples(task, length, count)]


def oracle(examples, wrong_task=None):
    """A generate_fn that answers from a lookup table (wrongly for one task), and records its batch shapes."""
    answers = {tuple(e.input_ids): (e.task, e.answer) for e in examples}
    shapes = []

    def generate(model, input_ids, max_new_tokens):
        shapes.append((tuple(input_ids.shape), max_new_tokens))
        rows = []
        for row in input_ids.tolist():
            task, answer = answers[tuple(row)]
            rows.append([0] * len(answer) if task == wrong_task else answer)
        return torch.tensor(rows)

    return generate, shapes


def test_evaluate_accuracy_scores_exact_matches_per_task(smoke_model):
    examples = examples_of_every_task()
    generate, _ = oracle(examples, wrong_task="variable_tracking")
    accuracy = evaluate_accuracy(smoke_model, examples, generate, progress=False)
    assert list(accuracy) == list(TASK_NAMES)
    assert accuracy == {task: 0.0 if task == "variable_tracking" else 1.0 for task in TASK_NAMES}


def test_evaluate_accuracy_batches_examples_of_one_task_length_and_answer_length(smoke_model):
    examples = examples_of_every_task(count=5)
    generate, shapes = oracle(examples)
    evaluate_accuracy(smoke_model, examples, generate, batch_size=2, progress=False)
    answer_lengths = {task: len(make_examples(task, 96, 1)[0].answer) for task in TASK_NAMES}
    assert sorted(shapes) == sorted(((n, 96), answer_lengths[t]) for t in TASK_NAMES for n in (2, 2, 1))


def test_full_cache_generate_returns_only_the_new_tokens(smoke_model):
    input_ids = torch.tensor([example.input_ids for example in make_examples("single_needle", 96, 2)])
    with torch.no_grad():
        generated = full_cache_generate(smoke_model.eval(), input_ids, 3)
    assert generated.shape[0] == 2 and 1 <= generated.shape[1] <= 3  # fewer when every row stopped at EOS


def test_accuracy_table_has_a_row_per_task_a_column_per_length_and_the_mean():
    table = format_accuracy_table({4096: {"a": 0.5, "b": 1.0}, 2048: {"a": 1.0, "b": 1.0}})
    lines = table.splitlines()
    assert lines[0].split() == ["task", "2048", "4096"]
    assert lines[2].split() == ["a", "100.0", "50.0"]
    assert lines[-1].split() == ["mean", "100.0", "75.0"]
