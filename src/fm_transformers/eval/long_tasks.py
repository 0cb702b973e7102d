"""Long-decoding tasks: answers long enough that LSA's level-1 recall fires several times while one is written.

With the default sizes every answer has 130 tokens, so a generation sees 1 + 129 // tau triggers (the one after
the prompt, then one every tau decode steps): 3 at tau 64, 9 at tau 16. Three tasks, each built from `Facts`
(statements to hide in the haystack, a question, its answer):
- long_needle: four needles `NEEDLE key value` with 130-token values; the question `QUERY key` names one.
- qa_block: 26 questions answered in sequence. 39 needles `NEEDLE key value` (values of 4 tokens); the question
  `QUERY k1 ... k26 ASK` lists 26 of their keys, the answer is `k1 v1 k2 v2 ...`. The whole answer is known
  at the question, so a lookahead can foresee it.
- long_chain: follow a chain writing each hop. Statements `LET source target` over names of 5 tokens, a chain of
  26 hops interleaved with a 13-hop distractor chain; `QUERY start` asks for the chain from its start name, the
  answer writes every name on it. Only the next hop is known before it is read: a lookahead made at one step
  cannot follow the chain beyond it.

Each answer token is copied from the context: the continuation of the current token where that token occurs in
a statement (the needle after its key, the next name after a chain's source), or, in qa_block, the next key of
the question block. All ids of an example or a document come from one `TokenDraw` over LONG_KEYS and
LONG_VALUES, so none occurs twice with two continuations. Contexts are exactly the requested length and end
with the question; the same (task, length, seed) always gives the same example.
"""

import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from ..layout import csa_chunks_of_spans
from .tasks import Example, example_rng, scatter
from .vocab import ASK, BOS, LET, LONG_KEYS, LONG_TASK_TOKENS, LONG_VALUES, NEEDLE, QUERY


@dataclass(frozen=True)
class Facts:
    """One question and what answers it. `evidence` indexes the statements that carry the answer."""

    task: str
    statements: list[list[int]]
    evidence: tuple[int, ...]
    question: list[int]
    answer: list[int]

    def tokens(self) -> int:
        """Statements, question and answer: what a document spends on this question besides filler."""
        return sum(map(len, self.statements)) + len(self.question) + len(self.answer)


class TokenDraw:
    """Keys and values for one example or document, none drawn twice (so every copy has one source)."""

    def __init__(self, rng: random.Random):
        self._pools = {"keys": rng.sample(LONG_KEYS, len(LONG_KEYS)), "values": rng.sample(LONG_VALUES, len(LONG_VALUES))}

    def _take(self, kind: str, count: int) -> list[int]:
        pool = self._pools[kind]
        if count > len(pool):
            raise ValueError(f"a document needs {count} more distinct {kind} than the {len(pool)} left: ask less of it")
        taken, self._pools[kind] = pool[:count], pool[count:]
        return taken

    def keys(self, count: int) -> list[int]:
        return self._take("keys", count)

    def values(self, count: int) -> list[int]:
        return self._take("values", count)


def long_needle_facts(draw: TokenDraw, rng: random.Random, value_len: int = 130, distractors: int = 3) -> Facts:
    keys = draw.keys(distractors + 1)
    values = [draw.values(value_len) for _ in keys]
    order = rng.sample(range(len(keys)), len(keys))  # needle i holds key order[i]
    statements = [[NEEDLE, keys[k], *values[k]] for k in order]
    return Facts("long_needle", statements, (order.index(0),), [QUERY, keys[0]], values[0])


def qa_block_facts(
    draw: TokenDraw, rng: random.Random, questions: int = 26, value_len: int = 4, distractors: int | None = None
) -> Facts:
    """`distractors` needles besides the asked ones (default: half as many)."""
    distractors = questions // 2 if distractors is None else distractors
    keys = draw.keys(questions + distractors)
    values = [draw.values(value_len) for _ in keys]
    order = rng.sample(range(len(keys)), len(keys))
    statements = [[NEEDLE, keys[k], *values[k]] for k in order]
    answer = [token for k in range(questions) for token in (keys[k], *values[k])]
    evidence = tuple(order.index(k) for k in range(questions))  # in the order the answer uses them
    return Facts("qa_block", statements, evidence, [QUERY, *keys[:questions], ASK], answer)


def long_chain_facts(
    draw: TokenDraw, rng: random.Random, hops: int = 26, name_len: int = 5, distractor_hops: int | None = None
) -> Facts:
    """Statements of each chain keep their order; the two chains are interleaved at random."""
    distractor_hops = hops // 2 if distractor_hops is None else distractor_hops
    chains = []
    for length in (hops, distractor_hops):
        names = [draw.keys(name_len) for _ in range(length + 1)]
        chains.append([[LET, *source, *target] for source, target in zip(names, names[1:])])
    asked = chains[0]
    start, answer = asked[0][1 : 1 + name_len], [t for statement in asked for t in statement[1 + name_len :]]
    turns = [0] * hops + [1] * distractor_hops
    rng.shuffle(turns)
    statements, evidence, taken = [], [], [0, 0]
    for chain in turns:
        if chain == 0:
            evidence.append(len(statements))
        statements.append(chains[chain][taken[chain]])
        taken[chain] += 1
    return Facts("long_chain", statements, tuple(evidence), [QUERY, *start], answer)


LONG_FACTS: dict[str, Callable[..., Facts]] = {
    "long_needle": long_needle_facts,
    "qa_block": qa_block_facts,
    "long_chain": long_chain_facts,
}
LONG_TASK_NAMES = tuple(LONG_FACTS)
# The option that sets each task's answer length, and its default (130 answer tokens).
SIZE_OPTIONS = {"long_needle": ("value_len", 130), "qa_block": ("questions", 26), "long_chain": ("hops", 26)}
# Tokens per answer item (a qa_block key and its 4-token value, a 5-token chain name); a long_needle answer is one
# item. An item's first token is a lookup (which needle, the question's next key, the next hop's name), every
# other token copies on from the one before.
ITEM_TOKENS = {"long_needle": None, "qa_block": 5, "long_chain": 5}


def make_facts(task: str, draw: TokenDraw, rng: random.Random, **sizes) -> Facts:
    if task not in LONG_FACTS:
        raise ValueError(f"unknown long task {task!r}; known: {', '.join(LONG_TASK_NAMES)}")
    return LONG_FACTS[task](draw, rng, **sizes)


def place(facts: Facts, length: int, rng: random.Random) -> Example:
    """BOS, the task token, the statements in random filler at uniform depths, then the question: `length`
    tokens. Example.evidence: start positions of the evidence statements, in order of appearance."""
    prefix = [BOS, LONG_TASK_TOKENS[facts.task]]
    haystack = length - len(prefix) - len(facts.question)
    needed = sum(map(len, facts.statements))
    if haystack < needed:
        raise ValueError(f"{facts.task} needs a context of at least {length - haystack + needed} tokens, got {length}")
    tokens, starts = scatter(facts.statements, haystack, rng)
    evidence = tuple(sorted(len(prefix) + starts[index] for index in facts.evidence))
    return Example(facts.task, prefix + tokens + facts.question, facts.answer, evidence)


def long_example(task: str, length: int, rng: random.Random, **sizes) -> Example:
    """One example; `sizes` go to the task's facts (e.g. value_len=32 for a shorter long_needle answer)."""
    return place(make_facts(task, TokenDraw(rng), rng, **sizes), length, rng)


def make_long_examples(task: str, length: int, count: int, seed: int | str = 0, **sizes) -> list[Example]:
    """`count` evaluation examples; example i depends only on (task, length, seed, i, sizes)."""
    tag = ",".join(f"{name}={value}" for name, value in sorted(sizes.items()))
    return [long_example(task, length, example_rng("long", task, length, seed, tag, index), **sizes) for index in range(count)]


def expected_triggers(answer_tokens: int, tau: int) -> int:
    """Level-1 triggers while `answer_tokens` are generated: one after the prompt (its last forward makes the
    first token), then one every tau decode steps (forwards tau, 2 tau, ... of the answer_tokens - 1)."""
    return 1 + (answer_tokens - 1) // tau


@lru_cache(maxsize=None)
def _footprint(task: str, size: int) -> int:
    """Tokens that facts of this task and main size take (the same for every draw)."""
    scratch = random.Random(0)
    option, _ = SIZE_OPTIONS[task]
    return make_facts(task, TokenDraw(scratch), scratch, **{option: size}).tokens()


def random_facts(task: str, draw: TokenDraw, rng: random.Random, budget: int) -> Facts:
    """Facts of `task` taking at most `budget` tokens, with a main size (SIZE_OPTIONS) drawn uniformly from 1 to
    the default and lowered until it fits: training sees answers of every length up to the evaluated one."""
    option, default = SIZE_OPTIONS[task]
    size = rng.randint(1, default)
    while size > 1 and _footprint(task, size) > budget:
        size -= 1
    if _footprint(task, size) > budget:
        raise ValueError(f"{task} needs at least {_footprint(task, 1)} tokens for one question, the budget is {budget}")
    return make_facts(task, draw, rng, **{option: size})


def first_error(prediction: list[int], answer: list[int], item_tokens: int | None) -> tuple[int, str] | None:
    """Where a generated answer first goes wrong and how, None when it is whole: "swap" (the next two tokens
    written in swapped order), "lookup" (an item's first token, ITEM_TOKENS), or "copy" (any other token)."""
    wrong = next((index for index, (token, want) in enumerate(zip(prediction, answer)) if token != want), None)
    if wrong is None:
        return None if len(prediction) == len(answer) else (min(len(prediction), len(answer)), "copy")
    if prediction[wrong : wrong + 2] == answer[wrong : wrong + 2][::-1]:
        return wrong, "swap"
    return wrong, "lookup" if starts_item(wrong, item_tokens) else "copy"


def starts_item(position, item_tokens: int | None):
    """Whether an answer position (an int, or a tensor of them) is an item's first token, a lookup (ITEM_TOKENS)."""
    return position == 0 if item_tokens is None else position % item_tokens == 0


def statement_tokens(example: Example) -> int:
    """Tokens of one of a long-task example's statements: a marker (NEEDLE, LET), then a needle's key and value
    (its value is long_needle's whole answer; a qa_block item, key and value, is ITEM_TOKENS long) or a chain's
    two names."""
    if example.task == "long_needle":
        return 2 + len(example.answer)
    if example.task == "qa_block":
        return 1 + ITEM_TOKENS["qa_block"]
    if example.task == "long_chain":
        return 1 + 2 * ITEM_TOKENS["long_chain"]
    raise ValueError(f"{example.task!r} is not a long task; known: {', '.join(LONG_TASK_NAMES)}")


def question_start(example: Example) -> int:
    """Position of the question's first token (its QUERY marker; a long-task context ends with the question)."""
    return len(example.input_ids) - 1 - example.input_ids[::-1].index(QUERY)


def evidence_chunks(example: Example, compress_rate: int) -> list[int]:
    """The compressed chunks holding any token of the example's evidence statements (those its answer is read
    from), ascending: what an oracle of the evidence keeps resident."""
    return _chunks_of_statements(example, example.evidence, compress_rate)


def statement_chunks(example: Example, compress_rate: int) -> list[int]:
    """The compressed chunks holding any token of any statement, evidence or distractor (every statement starts
    with a marker that filler never holds), ascending: what is left is filler, the question and the prefix."""
    starts = [position for position, token in enumerate(example.input_ids) if token in (NEEDLE, LET)]
    return _chunks_of_statements(example, starts, compress_rate)


def answer_evidence(example: Example) -> list[tuple[int, int]]:
    """The evidence statements' (start, stop) spans in the order the answer reads them, one per answer item: each
    statement ends with its item (a needle's value, a qa_block key and value, a chain hop's target name), and no
    token is drawn twice in an example, so an item's first token finds its statement."""
    size, item = statement_tokens(example), ITEM_TOKENS[example.task] or len(example.answer)
    by_first = {example.input_ids[start + size - item]: (start, start + size) for start in example.evidence}
    return [by_first[example.answer[first]] for first in range(0, len(example.answer), item)]


def window_evidence_chunks(
    spans: list[tuple[int, int]], task: str, answer_tokens: int, tau: int, compress_rate: int
) -> list[list[int]]:
    """Per level-1 trigger of an answer (expected_triggers), the chunks of the evidence that the next tau answer
    tokens are read from: trigger k's set serves the forwards that write answer tokens k tau to (k + 1) tau - 1,
    whose items' statements are `spans` (in answer order, one per item of ITEM_TOKENS; one for a whole-answer
    item). Narrower than the whole evidence at every trigger: what a window of decoding needs, as the paper's
    lookahead labels are."""
    item = ITEM_TOKENS[task] or answer_tokens
    if len(spans) != -(-answer_tokens // item):
        raise ValueError(f"{len(spans)} evidence spans for {answer_tokens} answer tokens of {item}-token items")
    windows = []
    for trigger in range(expected_triggers(answer_tokens, tau)):
        first, last = trigger * tau, min((trigger + 1) * tau, answer_tokens) - 1
        windows.append(csa_chunks_of_spans(spans[first // item : last // item + 1], compress_rate))
    return windows


def _chunks_of_statements(example: Example, starts, compress_rate: int) -> list[int]:
    size = statement_tokens(example)
    return csa_chunks_of_spans(((start, start + size) for start in starts), compress_rate)
