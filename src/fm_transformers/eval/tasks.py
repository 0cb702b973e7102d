"""RULER-style synthetic long-context tasks over the integer vocabulary of `vocab.py`, and exact-match scoring.

Five tasks, each a generator `(context_length, rng) -> Example`:
- single_needle: one needle `NEEDLE key value...` in random filler; the question names the key.
- multi_key_needle: several needles with distinct keys; the question names one of them.
- multi_value_needle: one key in several needles; the answer is all its values, in order of appearance.
- variable_tracking: chains `LET value x1`, `LET x1 x2`, ... (one queried, others distracting); the question
  names the starting value, the answer is every variable of its chain in order of assignment.
- common_words: aggregation with no filler: a word list where three words are far more frequent than any other;
  the answer is those three, most frequent first. No single statement carries it (it needs dense memory).

Every answer token of the retrieval tasks is the token that followed the current one where it last occurred
(the question `QUERY key` ends on the key, the needle goes on `key value...`, a chain `LET x1 x2` continues x1):
retrieval is an induction copy, the circuit small transformers learn first, made across the compressed branch.
All value tokens of an example are distinct, so every such copy has exactly one source.

Invariants the tests hold: `len(input_ids)` is exactly the requested context length; the input ends with the
question (`QUERY ...`) and QUERY occurs nowhere else (in the evaluation tasks); the same (task, length, seed)
always gives the same example; `Example.evidence` gives where the statements carrying the answer start. Seeds are
strings or ints turned into a `random.Random` through its string seeding, which is stable across processes and
Python runs (it does not depend on PYTHONHASHSEED).
"""

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise

from .vocab import BOS, FILLER, KEYS, LET, NEEDLE, QUERY, TASK_TOKENS, VALUES, VOCABULARIES


@dataclass(frozen=True)
class Example:
    """One task instance. `input_ids` ends with the question; the model must continue with `answer`.

    evidence: start positions (in input_ids) of the statements that carry the answer, in order of appearance;
    empty for the aggregation task, whose answer is spread over the whole context.
    recalled: positions inside input_ids whose token is itself a retrieval answer (the values of questions asked
    inside the context, training tasks only); training predicts them as it predicts `answer`.
    """

    task: str
    input_ids: list[int]
    answer: list[int]
    evidence: tuple[int, ...] = ()
    recalled: tuple[int, ...] = ()


def example_rng(*parts) -> random.Random:
    """A generator seeded by the joined parts, e.g. ("eval", task, length, seed, index): stable everywhere."""
    return random.Random("/".join(str(part) for part in parts))


def _content_ranges(vocabulary: str) -> tuple[range, range]:
    """The (keys, values) ranges of a vocabulary name of vocab.VOCABULARIES."""
    if vocabulary not in VOCABULARIES:
        raise ValueError(f"unknown vocabulary {vocabulary!r}; known: {', '.join(VOCABULARIES)}")
    return VOCABULARIES[vocabulary]


def _draw_values(count: int, size: int, rng: random.Random, values: range = VALUES) -> list[list[int]]:
    """`count` values of `size` tokens, all tokens distinct across them (each copy has one source)."""
    if count * size > len(values):
        raise ValueError(f"cannot draw {count} values of {size} distinct tokens from {len(values)} value ids")
    tokens = rng.sample(values, count * size)
    return [tokens[i * size : (i + 1) * size] for i in range(count)]


def _statement(key: int, value: list[int], marker: int = NEEDLE) -> list[int]:
    """`marker key value...`: a needle, or (marker QUERY) a question answered inside the context."""
    return [marker, key, *value]


def scatter(statements: list[list[int]], length: int, rng: random.Random) -> tuple[list[int], list[int]]:
    """`length` tokens of random filler with the statements inserted, in the given order, at uniform depths.

    Returns the tokens and the start offset of each statement.
    """
    filler_count = length - sum(len(statement) for statement in statements)
    cuts = sorted(rng.randint(0, filler_count) for _ in statements)  # filler tokens before each statement
    tokens: list[int] = []
    starts: list[int] = []
    placed = 0
    for cut, statement in zip(cuts, statements):
        tokens += rng.choices(FILLER, k=cut - placed)
        starts.append(len(tokens))
        tokens += statement
        placed = cut
    tokens += rng.choices(FILLER, k=filler_count - placed)
    return tokens, starts


def _assemble(
    task: str,
    statements: list[list[int]],
    evidence: list[int],
    question: list[int],
    answer: list[int],
    length: int,
    rng: random.Random,
) -> Example:
    """BOS, the task token, a haystack holding the statements, then `QUERY question`: exactly `length`."""
    prefix = [BOS, TASK_TOKENS[task]]
    suffix = [QUERY, *question]
    haystack = length - len(prefix) - len(suffix)
    needed = sum(len(statement) for statement in statements)
    if haystack < needed:
        minimum = needed + len(prefix) + len(suffix)
        raise ValueError(f"{task} needs a context of at least {minimum} tokens, got {length}")
    tokens, starts = scatter(statements, haystack, rng)
    offsets = tuple(len(prefix) + starts[index] for index in evidence)
    return Example(task, prefix + tokens + suffix, answer, offsets)


def single_needle(length: int, rng: random.Random, value_len: int = 3, vocabulary: str = "short") -> Example:
    """vocabulary: the content ranges of keys and values (vocab.VOCABULARIES); the evaluation uses "short"."""
    keys, values = _content_ranges(vocabulary)
    key = rng.choice(keys)
    (value,) = _draw_values(1, value_len, rng, values)
    return _assemble("single_needle", [_statement(key, value)], [0], [key], value, length, rng)


def multi_key_needle(
    length: int, rng: random.Random, n_keys: int = 4, value_len: int = 3, vocabulary: str = "short"
) -> Example:
    key_range, value_range = _content_ranges(vocabulary)
    keys = rng.sample(key_range, n_keys)
    values = _draw_values(n_keys, value_len, rng, value_range)
    target = rng.randrange(n_keys)
    statements = [_statement(key, value) for key, value in zip(keys, values)]
    return _assemble("multi_key_needle", statements, [target], [keys[target]], values[target], length, rng)


def multi_value_needle(length: int, rng: random.Random, n_values: int = 3, value_len: int = 2) -> Example:
    key = rng.choice(KEYS)
    values = _draw_values(n_values, value_len, rng)
    statements = [_statement(key, value) for value in values]
    answer = [token for value in values for token in value]
    return _assemble("multi_value_needle", statements, list(range(n_values)), [key], answer, length, rng)


def variable_tracking(length: int, rng: random.Random, n_chains: int = 2, hops: int = 4) -> Example:
    """Statements read left to right (`LET source target`), so following a chain is a chain of look-ups, each
    continuing the current variable the way the context did."""
    names = rng.sample(KEYS, n_chains * (hops + 1))
    starts = rng.sample(VALUES, n_chains)
    chains = []
    for chain in range(n_chains):
        variables = names[chain * (hops + 1) : (chain + 1) * (hops + 1)]
        sources = [starts[chain], *variables[:-1]]
        chains.append([[LET, source, target] for source, target in zip(sources, variables)])
    order = [chain for chain in range(n_chains) for _ in range(hops + 1)]
    rng.shuffle(order)  # interleave the chains, each keeping its own order
    statements, evidence, next_statement = [], [], [0] * n_chains
    for chain in order:
        if chain == 0:
            evidence.append(len(statements))
        statements.append(chains[chain][next_statement[chain]])
        next_statement[chain] += 1
    answer = names[: hops + 1]
    return _assemble("variable_tracking", statements, evidence, [starts[0]], answer, length, rng)


def common_words(length: int, rng: random.Random, shares: Sequence[float] = (0.16, 0.12, 0.08)) -> Example:
    """The context is a shuffled word list; word i of the answer fills `shares[i]` of it, and every other word
    occurs at most ceil(rest / pool) times, strictly fewer than the least common answer word."""
    body = length - 3  # BOS, task token, QUERY
    counts = [round(share * body) for share in shares]
    common = rng.sample(FILLER, len(shares))
    pool = [word for word in FILLER if word not in common]
    rare = body - sum(counts)
    rare_max = -(-rare // len(pool))
    if body < 0 or any(a <= b for a, b in pairwise(counts)) or counts[-1] <= rare_max:
        raise ValueError(f"common_words needs a longer context to separate word frequencies, got {length}")
    rng.shuffle(pool)
    words = [word for word, count in zip(common, counts) for _ in range(count)]
    words += [pool[index % len(pool)] for index in range(rare)]
    rng.shuffle(words)
    return Example("common_words", [BOS, TASK_TOKENS["common_words"], *words, QUERY], common)


def associative_recall(
    length: int, rng: random.Random, value_len: int = 2, tokens_per_pair: int = 64, vocabulary: str = "short"
) -> Example:
    """Training only (multi-query associative recall): one key-value needle per `tokens_per_pair` tokens, each
    asked once later in the context (`QUERY key value`, at a uniform distance after its needle), plus the final
    question. Every asked value is supervised, so a context teaches tens of retrievals instead of one: a model
    trained from scratch leaves the loss plateau far sooner than on one answer per context."""
    key_range, value_range = _content_ranges(vocabulary)
    pairs = max(1, min(length // tokens_per_pair, len(key_range), len(value_range) // value_len))
    keys = rng.sample(key_range, pairs)
    values = _draw_values(pairs, value_len, rng, value_range)
    told = [rng.random() for _ in range(pairs)]
    asked = [rng.uniform(time, 1.0) for time in told]
    needles = [(time, NEEDLE, pair) for pair, time in enumerate(told)]
    events = sorted(needles + [(time, QUERY, pair) for pair, time in enumerate(asked)])
    statements = [_statement(keys[pair], values[pair], marker) for _, marker, pair in events]
    queries = [index for index, (_, marker, _) in enumerate(events) if marker == QUERY]
    target = rng.randrange(pairs)
    example = _assemble("associative_recall", statements, queries, [keys[target]], values[target], length, rng)
    recalled = tuple(start + 2 + offset for start in example.evidence for offset in range(value_len))
    return Example(example.task, example.input_ids, example.answer, example.evidence, recalled)


TASKS: dict[str, Callable[[int, random.Random], Example]] = {
    "single_needle": single_needle,
    "multi_key_needle": multi_key_needle,
    "multi_value_needle": multi_value_needle,
    "variable_tracking": variable_tracking,
    "common_words": common_words,
}
TASK_NAMES = tuple(TASKS)
TRAINING_TASKS: dict[str, Callable[[int, random.Random], Example]] = {**TASKS, "associative_recall": associative_recall}


def make_example(task: str, length: int, rng: random.Random, **options) -> Example:
    """One example; `options` go to the task's generator (e.g. value_len for the needle tasks)."""
    if task not in TRAINING_TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TRAINING_TASKS)}")
    return TRAINING_TASKS[task](length, rng, **options)


def make_examples(task: str, length: int, count: int, seed: int | str = 0) -> list[Example]:
    """`count` evaluation examples; example i depends only on (task, length, seed, i)."""
    return [make_example(task, length, example_rng("eval", task, length, seed, index)) for index in range(count)]


def exact_match(prediction: Sequence[int], answer: Sequence[int]) -> bool:
    """True when the first len(answer) predicted tokens are the answer; the model is asked for exactly that
    many, so anything it adds after them is not part of its answer."""
    return list(prediction[: len(answer)]) == list(answer)


def tokens_right(prediction: Sequence[int], answer: Sequence[int]) -> int:
    """Answer tokens written at their place: the partial credit of a long answer, where one wrong token fails
    the exact match of all of them (a qa_block of 26 questions, a 26-hop chain)."""
    return sum(predicted == expected for predicted, expected in zip(prediction[: len(answer)], answer))


def accuracy(predictions: Sequence[Sequence[int]], examples: Sequence[Example]) -> float:
    """Fraction of examples answered exactly."""
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    if not examples:
        raise ValueError("accuracy of no examples is undefined")
    return sum(exact_match(p, e.answer) for p, e in zip(predictions, examples)) / len(examples)
