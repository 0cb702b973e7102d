from collections import Counter

import pytest

from fm_transformers.eval.tasks import (
    TASK_NAMES,
    accuracy,
    exact_match,
    make_examples,
)
from fm_transformers.eval.vocab import (
    FILLER,
    KEYS,
    LET,
    NEEDLE,
    QUERY,
    VALUES,
    VOCAB_SIZE,
)

LENGTHS = (97, 256, 1000)


def question(example):
    """The tokens after QUERY at the end of the input."""
    start = example.input_ids.index(QUERY)
    return example.input_ids[start + 1 :]


@pytest.mark.parametrize("task", TASK_NAMES)
def test_generators_are_deterministic_per_seed(task):
    assert make_examples(task, 256, 3, seed=7) == make_examples(task, 256, 3, seed=7)
    assert make_examples(task, 256, 3, seed=7) != make_examples(task, 256, 3, seed=8)


@pytest.mark.parametrize("task", TASK_NAMES)
@pytest.mark.parametrize("length", LENGTHS)
def test_context_length_is_exact_and_tokens_are_in_the_vocabulary(task, length):
    for example in make_examples(task, length, 3):
        assert len(example.input_ids) == length
        assert all(0 <= token < VOCAB_SIZE for token in example.input_ids + example.answer)


@pytest.mark.parametrize("task", TASK_NAMES)
def test_the_input_ends_with_the_only_question(task):
    for example in make_examples(task, 256, 3):
        assert example.input_ids.count(QUERY) == 1
        assert QUERY in example.input_ids[-2:]
        assert example.task == task and example.answer


@pytest.mark.parametrize("task", ["single_needle", "multi_key_needle"])
@pytest.mark.parametrize("length", LENGTHS)
def test_the_needle_with_the_queried_key_holds_the_answer_where_claimed(task, length):
    for example in make_examples(task, length, 5):
        key = question(example)
        (start,) = example.evidence
        needle = [NEEDLE, *key, *example.answer]
        assert example.input_ids[start : start + len(needle)] == needle
        assert all(token in KEYS for token in key) and all(token in VALUES for token in example.answer)


def test_multi_key_needles_have_distinct_keys_and_one_matches_the_question():
    for example in make_examples("multi_key_needle", 512, 5):
        starts = [i for i, token in enumerate(example.input_ids) if token == NEEDLE]
        keys = [tuple(example.input_ids[i + 1 : i + 2]) for i in starts]
        assert len(starts) == 4 and len(set(keys)) == 4
        assert keys.count(tuple(question(example))) == 1


def test_value_tokens_occur_only_inside_the_needles():
    for task in ("single_needle", "multi_key_needle", "multi_value_needle"):
        for example in make_examples(task, 1000, 3):
            inside = set()
            for start, token in enumerate(example.input_ids):
                if token == NEEDLE:
                    inside.update(range(start, start + 5))
            values = {i for i, token in enumerate(example.input_ids) if token in VALUES}
            assert values <= inside


@pytest.mark.parametrize("length", LENGTHS)
def test_multi_value_answer_is_every_value_of_the_key_in_order_of_appearance(length):
    for example in make_examples("multi_value_needle", length, 5):
        key = question(example)
        values = []
        for start in example.evidence:
            assert example.input_ids[start : start + 1 + len(key)] == [NEEDLE, *key]
            values += example.input_ids[start + 1 + len(key) : start + 3 + len(key)]
        assert list(example.evidence) == sorted(example.evidence) and len(example.evidence) == 3
        assert values == example.answer


@pytest.mark.parametrize("length", LENGTHS)
def test_variable_tracking_answer_follows_the_chain_from_the_queried_value(length):
    for example in make_examples("variable_tracking", length, 5):
        ids = example.input_ids
        statements = {ids[i + 1]: (i, ids[i + 2]) for i, token in enumerate(ids) if token == LET}
        assert len(statements) == 10  # two chains of five assignments
        (current,) = question(example)
        chain, positions = [], []
        while current in statements:
            position, current = statements[current]
            chain.append(current)
            positions.append(position)
        assert chain == example.answer and tuple(positions) == example.evidence
        assert all(token in KEYS for token in chain)


@pytest.mark.parametrize("length", LENGTHS)
def test_common_words_answer_is_the_three_most_frequent_most_frequent_first(length):
    for example in make_examples("common_words", length, 5):
        words = example.input_ids[2:-1]
        assert all(word in FILLER for word in words)
        counts = Counter(words)
        ranked = [word for word, _ in counts.most_common()]
        assert ranked[:3] == example.answer
        third, fourth = counts[ranked[2]], counts[ranked[3]]
        assert counts[ranked[0]] > counts[ranked[1]] > third > fourth
        assert example.evidence == ()


@pytest.mark.parametrize("task", TASK_NAMES)
def test_too_short_a_context_is_an_error_that_names_the_task(task):
    with pytest.raises(ValueError, match=task):
        make_examples(task, 8, 1)


def test_unknown_task_is_an_error_that_lists_the_known_ones():
    with pytest.raises(ValueError, match="single_needle"):
        make_examples("needle", 256, 1)


def test_exact_match_needs_every_answer_token_and_ignores_what_follows():
    assert exact_match([5, 6, 7], [5, 6, 7])
    assert exact_match([5, 6, 7, 9], [5, 6, 7])
    assert not exact_match([5, 6, 8], [5, 6, 7])
    assert not exact_match([5, 6], [5, 6, 7])


def test_accuracy_is_the_fraction_answered_exactly():
    examples = make_examples("single_needle", 128, 4)
    predictions = [e.answer for e in examples[:3]] + [[0, 0, 0]]
    assert accuracy(predictions, examples) == 0.75
    with pytest.raises(ValueError, match="predictions"):
        accuracy(predictions[:2], examples)


def test_answer_tokens_of_an_example_are_distinct_so_every_copy_has_one_source():
    for task in ("single_needle", "multi_key_needle", "multi_value_needle"):
        for example in make_examples(task, 512, 5):
            values = [token for token in example.input_ids if token in VALUES]
            assert len(values) == len(set(values))


@pytest.mark.parametrize(
    "task, options",
    [
        ("single_needle", {"value_len": 16}),
        ("multi_key_needle", {"value_len": 8}),
        ("associative_recall", {"tokens_per_pair": 16}),
    ],
)
def test_the_long_vocabulary_draws_keys_and_values_from_the_long_ranges_only(task, options):
    from fm_transformers.eval.tasks import example_rng, make_example
    from fm_transformers.eval.vocab import LONG_KEYS, LONG_VALUES

    for index in range(4):
        example = make_example(task, 256, example_rng("long-vocab", index), vocabulary="long", **options)
        content = [token for token in example.input_ids if token not in FILLER and token >= KEYS.start]
        assert content and not any(token in KEYS or token in VALUES for token in content)
        assert all(token in LONG_VALUES for token in example.answer)
        statement = example.input_ids[example.evidence[-1] :]  # a needle, or a question asked in the context
        assert statement[0] in (NEEDLE, QUERY) and statement[1] in LONG_KEYS
        values = [token for token in example.input_ids if token in LONG_VALUES]
        if task != "associative_recall":  # its questions repeat their values inside the context
            assert len(values) == len(set(values))
        short = make_example(task, 256, example_rng("long-vocab", index), **options)
        assert len(short.input_ids) == len(example.input_ids) == 256 and len(short.answer) == len(example.answer)


@pytest.mark.parametrize(
    "task, options", [("single_needle", {"value_len": 16}), ("associative_recall", {"tokens_per_pair": 16})]
)
def test_the_swapped_long_vocabulary_asks_for_key_ids_copied_from_the_context(task, options):
    """What every backbone stage now copies too: answers that are key ids (qa_block's next keys, long_chain's
    names)."""
    from fm_transformers.eval.tasks import example_rng, make_example
    from fm_transformers.eval.vocab import LONG_KEYS, LONG_VALUES

    for index in range(4):
        example = make_example(task, 256, example_rng("swapped", index), vocabulary="long-swapped", **options)
        assert example.answer and all(token in LONG_KEYS for token in example.answer)
        asked_key, ids = example.input_ids[-1], example.input_ids
        assert asked_key in LONG_VALUES
        (start,) = [i for i in range(len(ids) - 2) if ids[i] == NEEDLE and ids[i + 1] == asked_key]
        assert ids[start + 2 : start + 2 + len(example.answer)] == example.answer


def test_an_unknown_vocabulary_is_an_error_that_lists_the_known_ones():
    from fm_transformers.eval.tasks import example_rng, make_example

    with pytest.raises(ValueError, match="short, long"):
        make_example("single_needle", 128, example_rng("x"), vocabulary="huge")
