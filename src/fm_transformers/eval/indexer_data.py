"""The memory indexer's training data for the paper-layout backbone: question documents (qa_documents.py) and the
label settings of the paper's recipe, the vote scaled to the backbone.

Every question of a document ends at a position aligned to ALIGN, and so does the document's last question; the
dump triggers every tau tokens from `question_trigger_warmup`, which puts a trigger on every question end and
every tau steps of every answer for any tau dividing ALIGN. Those triggers carry meaning (what the answer will
read); the others fall in filler and are dropped afterwards (label_selection.py). After the last answer the
document goes on for ALIGN filler tokens, so its last triggers have a whole lookahead window.
"""

import math

from ..document import Document
from ..indexer import PAPER_CSA_LAYER_COUNT
from .qa_documents import AskedQuestion, qa_document
from .tasks import example_rng
from .vocab import FILLER

PAPER_VOTE = 3  # of the 21 CSA layers of V4-Flash
ALIGN = 64  # the largest tau evaluated
SPACING = 320  # tokens between questions, on average


def scaled_vote(num_csa_layers: int) -> int:
    """The paper's vote (3 of 21 CSA layers) at the same share of another backbone's CSA layers, rounded half up,
    at least 1: 1 of 7, 2 of 14."""
    if num_csa_layers < 1:
        raise ValueError("the backbone has no CSA layer: labels are voted by CSA layers")
    return max(1, math.floor(PAPER_VOTE * num_csa_layers / PAPER_CSA_LAYER_COUNT + 0.5))


def question_trigger_warmup(context_length: int, tau: int) -> int:
    """The dump's first trigger step such that position context_length - 1 (where every question of a document
    of that length ends, modulo ALIGN) is one."""
    return (context_length - 1) % tau


def question_documents(
    count: int, length: int, split: str, seed: int = 0, spacing: int = SPACING, align: int = ALIGN
) -> list[tuple[Document, tuple[AskedQuestion, ...]]]:
    """`count` question documents of `length` tokens plus the last answer and `align` filler tokens, each with
    its questions; `split` keeps the training, validation and test sets apart (and apart from the evaluation's
    examples, seeded otherwise)."""
    documents = []
    for index in range(count):
        rng = example_rng("indexer", split, seed, length, index)
        document = qa_document(length, rng, spacing=spacing, align=align)
        tokens = document.example.input_ids + document.example.answer + rng.choices(FILLER, k=align)
        documents.append((Document(f"{split}-{index}", tokens), document.questions))
    return documents
