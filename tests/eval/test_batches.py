from collections import Counter

import torch

from fm_transformers.eval.batches import (
    IGNORE,
    TRAINING_MIX,
    curriculum_length,
    make_batch,
)
from fm_transformers.eval.tasks import TASK_NAMES
from fm_transformers.eval.vocab import PAD, QUERY, TASK_TOKENS


def test_targets_are_the_answer_tokens_predicted_from_the_position_before_each():
    batch = make_batch(seed=0, step=3, context_length=128, batch_size=len(TRAINING_MIX))
    distilled_mask = torch.zeros(batch.input_ids.numel(), dtype=torch.bool)
    distilled_mask[batch.distill_rows] = True
    distilled_rows = distilled_mask.view_as(batch.input_ids).tolist()
    for ids, targets, rows in zip(batch.input_ids.tolist(), batch.targets.tolist(), distilled_rows):
        answer_at = [i for i, target in enumerate(targets) if target != IGNORE]
        final = [i for i in answer_at if i >= 127]
        assert final == list(range(127, 127 + len(final))) and QUERY in ids[126:128]
        # teacher forcing: answer token j is the input at the position after the one predicting it
        assert all(ids[i + 1] == targets[i] for i in answer_at[:-1])
        # every position that predicts an answer is distilled, and so is the final question
        assert all(rows[i] for i in answer_at) and rows[ids[:128].index(QUERY, 126 - 2)]
        assert all(token == PAD for token in ids[final[-1] + 1 :])


def test_associative_recall_rows_supervise_every_value_asked_inside_the_context():
    batch = make_batch(seed=0, step=0, context_length=256, batch_size=4, mix=(("associative_recall", {}),))
    for ids, targets in zip(batch.input_ids.tolist(), batch.targets.tolist()):
        inner = [i for i, target in enumerate(targets[:255]) if target != IGNORE]
        asked = [i for i, token in enumerate(ids[:254]) if token == QUERY]  # the final question is at 254
        assert len(inner) == 2 * len(asked) and len(asked) >= 2  # two value tokens per question
        assert all(ids[i + 1] == targets[i] for i in inner)


def test_a_batch_takes_every_entry_of_the_training_mix_in_turn():
    batch = make_batch(seed=0, step=0, context_length=128, batch_size=2 * len(TRAINING_MIX))
    expected = Counter(TASK_TOKENS[task] for task, _ in TRAINING_MIX for _ in range(2))
    assert Counter(batch.input_ids[:, 1].tolist()) == expected
    assert set(expected) == {TASK_TOKENS[task] for task in (*TASK_NAMES, "associative_recall")}


def test_batches_depend_only_on_seed_and_step():
    first, again = make_batch(1, 5, 128, 4), make_batch(1, 5, 128, 4)
    assert torch.equal(first.input_ids, again.input_ids) and torch.equal(first.targets, again.targets)
    assert not torch.equal(first.input_ids, make_batch(1, 6, 128, 4).input_ids)


def test_curriculum_length_grows_to_the_maximum_and_stays_in_bounds():
    lengths = [curriculum_length(0, step, 256, 2048, ramp_steps=100) for step in range(300)]
    assert all(256 <= n <= 2048 and (n - 256) % 64 == 0 for n in lengths)
    assert max(lengths[:10]) <= 256 + 64 * 3
    assert min(lengths[100:]) >= 1024 and max(lengths[100:]) == 2048


def test_a_long_mix_batch_supervises_the_answers_given_inside_question_documents():
    from fm_transformers.eval.batches import LONG_TRAINING_MIX
    from fm_transformers.eval.vocab import LONG_TASK_TOKENS

    batch = make_batch(seed=0, step=0, context_length=1024, batch_size=len(LONG_TRAINING_MIX), mix=LONG_TRAINING_MIX)
    for ids, targets in zip(batch.input_ids.tolist(), batch.targets.tolist()):
        answered = [i for i, target in enumerate(targets) if target != IGNORE]
        assert answered and all(ids[i + 1] == targets[i] for i in answered[:-1])
        if ids[1] == LONG_TASK_TOKENS["qa_document"]:  # a question document: answers inside the context are supervised too
            assert min(answered) < 1023 - 64


def test_the_copy_mix_fits_inside_the_window_and_trains_mostly_long_ids():
    from fm_transformers.eval.batches import COPY_TRAINING_MIX
    from fm_transformers.eval.vocab import LONG_TASK_TOKENS, LONG_VOCAB_SIZE, TASK_TOKENS

    batch = make_batch(seed=0, step=0, context_length=64, batch_size=2 * len(COPY_TRAINING_MIX), mix=COPY_TRAINING_MIX)
    tasks = Counter(batch.input_ids[:, 1].tolist())
    assert all(tasks[LONG_TASK_TOKENS[task]] == 2 for task in ("long_needle", "qa_block", "long_chain"))
    short_rows = [row for row in range(batch.input_ids.shape[0]) if int(batch.input_ids[row].max()) < 528]
    assert len(short_rows) == 2
    assert all(batch.input_ids[row, 1] == TASK_TOKENS["associative_recall"] for row in short_rows)
    for row in range(batch.input_ids.shape[0]):
        answers = batch.targets[row][batch.targets[row] != IGNORE]
        assert answers.numel() > 0
        if row not in short_rows:
            assert int(answers.min()) >= 528 and int(answers.max()) < LONG_VOCAB_SIZE
    # every supervised answer at 64 tokens is copied from inside the 64-token window
    for ids, targets in zip(batch.input_ids.tolist(), batch.targets.tolist()):
        for i, target in enumerate(targets):
            if target != IGNORE and i >= 64:
                assert target in ids[max(0, i - 64) : i]


def test_the_recall_mix_supervises_long_values_and_key_ids_copied_from_its_own_context():
    from fm_transformers.eval.batches import RECALL_TRAINING_MIX
    from fm_transformers.eval.vocab import LONG_KEYS, LONG_VALUES, TASK_TOKENS

    batch = make_batch(seed=0, step=0, context_length=64, batch_size=8, mix=RECALL_TRAINING_MIX)
    assert (batch.input_ids[:, 1] == TASK_TOKENS["associative_recall"]).all()
    written = set()
    for ids, targets in zip(batch.input_ids.tolist(), batch.targets.tolist()):
        answers = [(i, target) for i, target in enumerate(targets) if target != IGNORE]
        assert len(answers) >= 8
        assert all(target in ids[max(0, i - 64) : i] for i, target in answers)
        roles = {"value" if target in LONG_VALUES else "key" if target in LONG_KEYS else None for _, target in answers}
        assert len(roles) == 1 and None not in roles  # one role a row
        written |= roles
    assert written == {"value", "key"}  # half the rows write key ids (the fifth run's backbone wrote none)


def test_every_mix_stays_inside_the_vocabulary_it_declares_and_a_backbone_too_small_is_refused():
    import pytest

    from fm_transformers.eval.backbone_training import TrainingConfig
    from fm_transformers.eval.batches import MIX_VOCAB_SIZES, MIXES

    assert set(MIX_VOCAB_SIZES) == set(MIXES)
    for name, mix in MIXES.items():
        for step in range(3):
            batch = make_batch(seed=0, step=step, context_length=512, batch_size=2 * len(mix), mix=mix)
            assert int(batch.input_ids.max()) < MIX_VOCAB_SIZES[name]
    with pytest.raises(ValueError, match="use a size of"):
        TrainingConfig(size="small", mix="copy")
