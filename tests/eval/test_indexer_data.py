from fm_transformers.eval.indexer_data import indexer_documents, question_trigger_warmup
from fm_transformers.eval.tasks import TASK_NAMES, make_examples
from fm_transformers.eval.vocab import QUERY
from fm_transformers.training.labels import trigger_positions


def test_a_trigger_falls_on_the_last_question_token_with_the_answer_in_its_window():
    length, tau = 200, 16
    warmup = question_trigger_warmup(length, tau)
    for document in indexer_documents(2 * len(TASK_NAMES), length, tau, split="train"):
        assert len(document.input_ids) == length + tau - 1
        assert length - 1 in trigger_positions(len(document.input_ids), warmup, tau).tolist()
        assert QUERY in document.input_ids[length - 2 : length]


def test_documents_continue_with_the_answer_and_differ_from_the_evaluation_examples():
    length, tau = 200, 16
    documents = indexer_documents(len(TASK_NAMES), length, tau, split="train")
    single = documents[TASK_NAMES.index("single_needle")].input_ids
    key = single[length - 1]
    needle = single.index(key)  # the key occurs in the needle first, then in the question
    assert single[length : length + 3] == single[needle + 1 : needle + 4]
    evaluation = {tuple(e.input_ids) for task in TASK_NAMES for e in make_examples(task, length, 3)}
    assert all(tuple(document.input_ids[:length]) not in evaluation for document in documents)
    heldout = indexer_documents(len(TASK_NAMES), length, tau, split="heldout")
    assert all(a.input_ids != b.input_ids for a, b in zip(documents, heldout))
