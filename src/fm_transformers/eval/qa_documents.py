"""Documents that ask a question every few hundred tokens and answer it in place: the data on which the
paper-layout backbone learns to answer inside long contexts, and whose questions give the memory indexer's
training triggers a meaning (at a question, the chunks its answer will read; inside an answer, those still to
be read).

A document of `length` tokens holds about length // spacing questions of the long tasks (long_tasks.py), each
with facts drawn to fit half a spacing (or half the document, if shorter). The statements of each question lie at random places before it; every
question but the last is followed by its answer, the last ends the document (Example.answer). As an Example:
input_ids up to the last question, the inline answers' positions in `recalled` (training supervises them as it
supervises the final answer). `questions` says where each question ends and where its evidence lies.

With `align`, every question ends at a position p with p = length - 1 (mod align): a label dump that triggers
every tau steps (tau dividing align) from such a position triggers at every question and every tau steps of
every answer, so those triggers can be picked out of it (label_selection.py).
"""

import random
from dataclasses import dataclass

from ..layout import csa_chunks_of_spans
from .long_tasks import LONG_TASK_NAMES, TokenDraw, expected_triggers, random_facts, window_evidence_chunks
from .tasks import Example
from .vocab import BOS, FILLER, LONG_TASK_TOKENS


@dataclass(frozen=True)
class AskedQuestion:
    """end: position of the question's last token (where a trigger must foresee the answer);
    evidence: (start, stop) token spans of the statements that carry its answer."""

    task: str
    end: int
    answer_tokens: int
    evidence: tuple[tuple[int, int], ...]

    def trigger_positions(self, tau: int) -> list[int]:
        """Where LSA triggers while this question is answered: its end, then every tau steps of the answer."""
        return [self.end + step * tau for step in range(expected_triggers(self.answer_tokens, tau))]

    def evidence_chunks(self, compress_rate: int) -> list[int]:
        """Compressed chunks holding a token of the evidence (layout.csa_chunks_of_spans)."""
        return csa_chunks_of_spans(self.evidence, compress_rate)

    def window_evidence_chunks(self, tau: int, compress_rate: int) -> list[list[int]]:
        """Per trigger (trigger_positions), the chunks of the evidence the next tau answer tokens are read from
        (long_tasks.window_evidence_chunks; `evidence` is in the order the answer reads it)."""
        return window_evidence_chunks(list(self.evidence), self.task, self.answer_tokens, tau, compress_rate)


@dataclass(frozen=True)
class QADocument:
    example: Example
    questions: tuple[AskedQuestion, ...]  # in order of appearance; the last is the example's final question


def qa_document(
    length: int, rng: random.Random, spacing: int = 320, align: int = 1, tasks: tuple[str, ...] = LONG_TASK_NAMES
) -> QADocument:
    count = max(1, length // spacing)
    draw = TokenDraw(rng)
    facts = [random_facts(rng.choice(tasks), draw, rng, min(spacing, length) // 2) for _ in range(count)]
    asked_at = [(j + 1 - 0.5 * rng.random()) / count for j in range(count - 1)] + [1.0]
    # (time in [0, 1], question, statement index or None for the question itself); a question's statements
    # come before it (a stable sort keeps ties in this order)
    events = [(rng.uniform(0, asked_at[j]), j, s) for j, f in enumerate(facts) for s in range(len(f.statements))]
    events += [(asked_at[j], j, None) for j in range(count - 1)]
    events.sort(key=lambda event: event[0])
    return _lay_out(facts, events, length, align, rng)


def _lay_out(facts, events, length: int, align: int, rng: random.Random) -> QADocument:
    """Filler before each event in proportion to its time, plus what aligns each question's end."""
    final = facts[-1]
    prefix = [BOS, LONG_TASK_TOKENS["qa_document"]]
    inline = [f.question + f.answer for f in facts[:-1]]
    content = sum(len(facts[j].statements[s]) if s is not None else len(inline[j]) for _, j, s in events)
    filler = length - len(prefix) - content - len(final.question) - (len(facts) - 1) * (align - 1)
    if filler < 0:
        raise ValueError(f"{len(facts)} questions need more than {length} tokens: lower the length or raise the spacing")
    tokens, placed, recalled = list(prefix), 0, []
    starts: dict[tuple[int, int], int] = {}
    ends = {len(facts) - 1: length - 1}
    for time, j, s in events:
        gap = max(0, round(filler * time) - placed)
        if s is None:
            gap += (length - 1 - (len(tokens) + gap + len(facts[j].question) - 1)) % align
        tokens += rng.choices(FILLER, k=gap)
        placed += gap
        if s is not None:
            starts[(j, s)] = len(tokens)
            tokens += facts[j].statements[s]
            continue
        ends[j] = len(tokens) + len(facts[j].question) - 1
        recalled += range(ends[j] + 1, ends[j] + 1 + len(facts[j].answer))
        tokens += inline[j]
    tokens += rng.choices(FILLER, k=length - len(tokens) - len(final.question)) + final.question
    questions = tuple(
        AskedQuestion(f.task, ends[j], len(f.answer), tuple((starts[j, s], starts[j, s] + len(f.statements[s])) for s in f.evidence))
        for j, f in enumerate(facts)
    )
    evidence = tuple(sorted(start for start, _ in questions[-1].evidence))
    return QADocument(Example("qa_document", tokens, final.answer, evidence, tuple(recalled)), questions)
