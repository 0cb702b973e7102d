"""The task sets by name: which tasks an evaluation scores, and how any task's examples are made.

"ruler": the RULER-style tasks of tasks.py (short answers), the evaluation of the 4-CSA-layer backbone.
"long": the long-decoding tasks of long_tasks.py, the evaluation of the paper-layout backbone.
"recall", "copy": the long tasks too (at short answers, --answer-tokens), the checks of the paper-layout
backbone's first two stages (batches.RECALL_TRAINING_MIX at 64 tokens, whose own measure is the training log's
answer-token accuracy; batches.COPY_TRAINING_MIX, which trains on the long tasks at contexts of 64-512 tokens).
Training draws on more generators than it evaluates (`training_example`): associative recall, the long tasks at
random sizes that fit the context, and question documents (qa_documents.py).
"""

import random

from .long_tasks import LONG_TASK_NAMES, SIZE_OPTIONS, TokenDraw, make_long_examples, place, random_facts
from .qa_documents import qa_document
from .tasks import TASK_NAMES, TRAINING_TASKS, Example, make_examples

TASK_SETS = {"ruler": TASK_NAMES, "recall": LONG_TASK_NAMES, "copy": LONG_TASK_NAMES, "long": LONG_TASK_NAMES}


def sizes_for_answer(task: str, answer_tokens: int | None) -> dict:
    """The size options that give a long task's answer about `answer_tokens` tokens (None: the default 130);
    the two tasks of five-token steps round down to a multiple of 5."""
    if answer_tokens is None:
        return {}
    option, _ = SIZE_OPTIONS[task]
    return {option: answer_tokens if task == "long_needle" else max(1, answer_tokens // 5)}


def evaluation_examples(task: str, length: int, count: int, seed: int | str = 0, answer_tokens: int | None = None) -> list[Example]:
    """`count` evaluation examples of any task; `answer_tokens` sizes the long tasks only."""
    if task in LONG_TASK_NAMES:
        return make_long_examples(task, length, count, seed, **sizes_for_answer(task, answer_tokens))
    return make_examples(task, length, count, seed)


def training_example(task: str, length: int, rng: random.Random, **options) -> Example:
    """One training example: a task of tasks.py (with its options), a long task at a random size that fits half
    the context, or a question document ("qa_document", options of qa_documents.qa_document)."""
    if task == "qa_document":
        return qa_document(length, rng, **options).example
    if task in LONG_TASK_NAMES:
        return place(random_facts(task, TokenDraw(rng), rng, length // 2), length, rng)
    if task not in TRAINING_TASKS:
        known = (*TRAINING_TASKS, *LONG_TASK_NAMES, "qa_document")
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(known)}")
    return TRAINING_TASKS[task](length, rng, **options)
