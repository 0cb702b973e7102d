import random
from collections import Counter

import pytest

from fm_transformers.eval.long_tasks import (
    ITEM_TOKENS,
    LONG_TASK_NAMES,
    TokenDraw,
    answer_evidence,
    evidence_chunks,
    expected_triggers,
    first_error,
    long_example,
    make_long_examples,
    question_start,
    random_facts,
    statement_chunks,
    statement_tokens,
    window_evidence_chunks,
)
from fm_transformers.eval.catalog import evaluation_examples
from fm_transformers.eval.qa_documents import qa_document
from fm_transformers.eval.tasks import exact_match
from fm_transformers.eval.vocab import ASK, LET, LONG_KEYS, LONG_VALUES, LONG_VOCAB_SIZE, NEEDLE, QUERY

EVALUATED_LENGTHS = (2048, 4096, 8192)


def needles(ids):
    """key -> the value tokens after it, for every `NEEDLE key value` (values run until a non-value token)."""
    found = {}
    for start, token in enumerate(ids):
        if token == NEEDLE:
            stop = start + 2
            while stop < len(ids) and ids[stop] in LONG_VALUES:
                stop += 1
            found[ids[start + 1]] = ids[start + 2 : stop]
    return found


def solve(example, name_len=5):
    """The answer worked out from the context alone, as a reader of the task's rules would."""
    ids = example.input_ids
    question = ids[len(ids) - ids[::-1].index(QUERY) :]
    if example.task == "long_needle":
        return needles(ids)[question[0]]
    if example.task == "qa_block":
        values = needles(ids)
        return [token for key in question[: question.index(ASK)] for token in (key, *values[key])]
    links = {tuple(ids[i + 1 : i + 1 + name_len]): tuple(ids[i + 1 + name_len : i + 1 + 2 * name_len]) for i, t in enumerate(ids) if t == LET}
    name, answer = tuple(question), []
    while name in links:
        name = links[name]
        answer += name
    return answer


@pytest.mark.parametrize("task", LONG_TASK_NAMES)
def test_long_generators_are_deterministic_per_seed(task):
    assert make_long_examples(task, 1024, 2, seed=3) == make_long_examples(task, 1024, 2, seed=3)
    assert make_long_examples(task, 1024, 2, seed=3) != make_long_examples(task, 1024, 2, seed=4)


@pytest.mark.parametrize("task", LONG_TASK_NAMES)
@pytest.mark.parametrize("length", (1024, 2048))
def test_the_answer_follows_from_the_context_and_is_checked_by_exact_match(task, length):
    for example in make_long_examples(task, length, 3):
        assert len(example.input_ids) == length
        assert all(0 <= token < LONG_VOCAB_SIZE for token in example.input_ids + example.answer)
        assert solve(example) == example.answer and exact_match(example.answer, example.answer)
        wrong = example.answer[:-1] + [example.answer[-2]]
        assert not exact_match(wrong, example.answer)


@pytest.mark.parametrize("task", LONG_TASK_NAMES)
def test_ids_never_repeat_with_two_continuations(task):
    for example in make_long_examples(task, 2048, 3):
        counts = Counter(example.input_ids)
        assert max(counts[token] for token in LONG_VALUES) <= 1  # a value is stated once
        assert max(counts[token] for token in LONG_KEYS) == 2  # a key or name: stated, then asked or followed


@pytest.mark.parametrize("task", LONG_TASK_NAMES)
def test_every_evaluated_length_gets_an_answer_long_enough_for_three_triggers_at_tau_16_and_64(task):
    for length in EVALUATED_LENGTHS:
        (example,) = make_long_examples(task, length, 1)
        assert len(example.answer) == 130
        assert expected_triggers(len(example.answer), 16) == 9 and expected_triggers(len(example.answer), 64) == 3


def test_expected_triggers_counts_the_prompt_trigger_and_one_every_tau_decode_steps():
    assert [expected_triggers(n, 16) for n in (1, 16, 17, 32, 33)] == [1, 1, 2, 2, 3]


def test_a_context_too_short_for_the_facts_is_an_error_that_names_the_task():
    with pytest.raises(ValueError, match="long_needle needs a context of at least"):
        long_example("long_needle", 256, random.Random(0))


def test_random_facts_fit_their_budget_and_vary_in_size():
    rng = random.Random(0)
    sizes = set()
    for task in LONG_TASK_NAMES * 10:
        facts = random_facts(task, TokenDraw(rng), rng, budget=160)
        assert facts.tokens() <= 160
        sizes.add(len(facts.answer))
    assert len(sizes) > 5


def test_a_question_document_answers_each_question_in_place_and_aligns_every_question_end():
    document = qa_document(2048, random.Random(5), spacing=320, align=64)
    ids, questions = document.example.input_ids, document.questions
    assert len(ids) == 2048 and len(questions) == 6 and questions[-1].end == 2047
    assert all(q.end % 64 == 2047 % 64 for q in questions)
    recalled = set(document.example.recalled)
    for question in questions[:-1]:
        answer = range(question.end + 1, question.end + 1 + question.answer_tokens)
        assert set(answer) <= recalled and ids[question.end] in (ASK, *LONG_KEYS)
    for question in questions:
        assert all(stop <= question.end - 1 for _, stop in question.evidence)
        assert all(ids[start] in (NEEDLE, LET) for start, _ in question.evidence)
    assert document.example.evidence == tuple(sorted(start for start, _ in questions[-1].evidence))


def test_question_triggers_are_the_question_end_and_every_tau_steps_of_its_answer():
    (question, *_) = qa_document(2048, random.Random(5), align=64).questions
    assert question.trigger_positions(16) == [question.end + 16 * k for k in range(expected_triggers(question.answer_tokens, 16))]
    holding = {p // 4 + d for start, stop in question.evidence for p in range(start, stop) for d in (0, 1)}
    assert question.evidence_chunks(4) == sorted(holding)


def test_a_document_too_short_for_its_questions_is_an_error():
    with pytest.raises(ValueError, match="questions need more than"):
        qa_document(400, random.Random(0), spacing=100, align=200)  # three questions to align: 597 tokens


def test_first_error_says_where_a_generated_answer_first_goes_wrong_and_how():
    answer = list(range(100, 115))  # three items of five tokens
    assert first_error(answer, answer, 5) is None
    assert first_error([999, *answer[1:]], answer, None) == (0, "lookup")
    assert first_error([*answer[:5], 999, *answer[6:]], answer, 5) == (5, "lookup")  # an item's first token
    assert first_error([*answer[:5], 999, *answer[6:]], answer, None) == (5, "copy")  # one item: copying on
    swapped = [*answer[:7], answer[8], answer[7], *answer[9:]]
    assert first_error(swapped, answer, 5) == (7, "swap")
    assert first_error([*answer[:7], answer[8], 999, *answer[9:]], answer, 5) == (7, "copy")  # not a swap
    assert first_error([*answer[:14], answer[13]], answer, 5) == (14, "copy")  # the last token: nothing to swap
    assert first_error(answer[:10], answer, 5) == (10, "copy")  # stopped early


@pytest.mark.parametrize("task", LONG_TASK_NAMES)
def test_evidence_statements_span_exactly_the_tokens_the_answer_is_read_from(task):
    for example in evaluation_examples(task, 1024, 3, seed=5, answer_tokens=40):
        size = statement_tokens(example)
        spans = [example.input_ids[start : start + size] for start in example.evidence]
        assert all(span[0] in (NEEDLE, LET) for span in spans)
        assert all(span[-1] in example.answer for span in spans)  # ends on a value or a name, not in filler
        assert set(example.answer) <= {token for span in spans for token in span}
        chunks = evidence_chunks(example, 4)
        holding = {p // 4 + d for start in example.evidence for p in range(start, start + size) for d in (0, 1)}
        assert chunks == sorted(holding)  # a token lies in two overlapping chunks (tests/test_layout.py)
        statements = statement_chunks(example, 4)
        assert set(chunks) < set(statements)  # every task has distractors
        assert example.input_ids[question_start(example)] == QUERY
        assert max(statements) <= (question_start(example) - 1) // 4 + 1  # every statement before the question
        markers = {p // 4 + d for p, t in enumerate(example.input_ids) if t in (NEEDLE, LET) for d in (0, 1)}
        assert markers <= set(statements)  # distractors too


@pytest.mark.parametrize("task", LONG_TASK_NAMES)
def test_the_answer_reads_its_evidence_in_order_and_a_window_needs_only_its_items_statements(task):
    for example in evaluation_examples(task, 1024, 3, seed=5, answer_tokens=40):
        item = ITEM_TOKENS[task] or len(example.answer)
        spans = answer_evidence(example)
        assert sorted(start for start, _ in spans) == list(example.evidence)  # every statement, once
        for index, (start, stop) in enumerate(spans):  # statement i ends with answer item i
            assert example.input_ids[stop - item : stop] == example.answer[index * item : (index + 1) * item]
        windows = window_evidence_chunks(spans, task, len(example.answer), 16, 4)
        assert len(windows) == expected_triggers(len(example.answer), 16)
        assert sorted(set().union(*windows)) == evidence_chunks(example, 4)  # together: the whole evidence
        for trigger, chunks in enumerate(windows):  # tokens 16 k to 16 k + 15 read items 16 k // 5 to ...
            read = range(16 * trigger // item, min(16 * trigger + 15, len(example.answer) - 1) // item + 1)
            holding = {p // 4 + d for i in read for p in range(*spans[i]) for d in (0, 1)}
            assert chunks == sorted(holding)
        if task != "long_needle":  # one item: the whole evidence at every trigger
            assert max(map(len, windows)) < len(evidence_chunks(example, 4))
    with pytest.raises(ValueError, match="evidence spans for 40 answer tokens"):
        window_evidence_chunks(spans[:-1] if len(spans) > 1 else [], task, 40, 16, 4)


def test_a_question_documents_window_evidence_is_its_answers_items_statements():
    for question in qa_document(2048, random.Random(5), align=64).questions:
        windows = question.window_evidence_chunks(16, 4)
        assert len(windows) == len(question.trigger_positions(16))
        assert sorted(set().union(*windows)) == question.evidence_chunks(4)
