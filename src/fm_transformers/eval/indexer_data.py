"""Documents for training the evaluation backbone's memory indexer with the project's own pipeline
(`fm_transformers.training`): task examples, each continued by its answer.

LSA's decisive trigger in the evaluation is the one right after prefill, at the question's last token: its
lookahead window is the answer. The dump triggers every `tau` tokens from `warmup`, so every document here has
the same context length, `warmup = (context_length - 1) % tau` puts a trigger on that last token, and filler
after the answer gives the trigger its whole window. Earlier triggers (inside the haystack) are trained too,
as in any document.
"""

from ..document import Document
from .tasks import TASK_NAMES, example_rng, make_example
from .vocab import FILLER


def question_trigger_warmup(context_length: int, tau: int) -> int:
    """The dump's first trigger step such that the question's last token (position context_length - 1) is one."""
    return (context_length - 1) % tau


def indexer_documents(count: int, context_length: int, tau: int, split: str, seed: int = 0) -> list[Document]:
    """`count` documents of `context_length + tau - 1` tokens, the evaluation tasks in turn; `split` keeps the
    training and held-out sets apart (and apart from the evaluation's own examples, seeded by "eval")."""
    documents = []
    for index in range(count):
        task = TASK_NAMES[index % len(TASK_NAMES)]
        rng = example_rng("indexer", split, seed, index)
        example = make_example(task, context_length, rng)
        tail = rng.choices(FILLER, k=tau - 1 - len(example.answer))
        documents.append(Document(f"{split}-{index}", example.input_ids + example.answer + tail))
    return documents
