"""The memory indexer's data for the paper-layout backbone: question documents, a dump in blocks, the triggers
kept (question ends and every tau steps of answers), a coarser tau made from the same dump, and the gate."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fm_transformers.eval import build_eval_backbone, eval_backbone_config
from fm_transformers.eval.dump_blocks import block_directories, dump_in_blocks, is_complete
from fm_transformers.eval.gate import gate_metrics, label_scores, selection_score
from fm_transformers.eval.indexer_data import question_documents, question_trigger_warmup, scaled_vote
from fm_transformers.eval.label_selection import (
    EVIDENCE,
    EVIDENCE_WINDOW,
    QUESTIONS,
    read_questions,
    select_label_sets,
    select_labels,
)
from fm_transformers.indexer import MemoryIndexerModel, default_target_layers
from fm_transformers.training import DumpConfig, LabelConfig, LabelShards, dump_labels
from fm_transformers.training.shards import MANIFEST

LENGTH, ALIGN = 384, 8


@pytest.fixture(scope="module")
def model():
    return build_eval_backbone(eval_backbone_config("paper-smoke"), seed=0).eval()


@pytest.fixture(scope="module")
def documents():
    return question_documents(3, LENGTH, "train", spacing=128, align=ALIGN)


def dump_config(model, tau, vote=None):
    vote = scaled_vote(7) if vote is None else vote
    labels = LabelConfig(tau=tau, warmup=question_trigger_warmup(LENGTH, tau), vote=vote)
    return DumpConfig(target_layers=tuple(default_target_layers(model.config)), labels=labels, chunk_size=128)


@pytest.fixture(scope="module")
def raw(model, documents, tmp_path_factory):
    """Raw dumps at tau 4 (in blocks of two documents) and at tau 8, of the same documents, and one at tau 8 with
    vote 2."""
    root = tmp_path_factory.mktemp("labels")
    plain = [document for document, _ in documents]
    assert dump_in_blocks(model, plain, root / "tau4", dump_config(model, 4), "smoke", block_size=2)
    with torch.no_grad():
        dump_labels(model, plain, root / "tau8", dump_config(model, 8), "smoke")
        dump_labels(model, plain, root / "tau8-vote2", dump_config(model, 8, vote=2), "smoke")
    return root, {document.doc_id: questions for document, questions in documents}


def test_the_vote_is_the_papers_share_of_the_csa_layers():
    assert [scaled_vote(n) for n in (21, 7, 14, 4, 1)] == [3, 1, 2, 1, 1]
    with pytest.raises(ValueError, match="no CSA layer"):
        scaled_vote(0)


def test_question_documents_are_seeded_and_end_with_room_for_the_last_window(documents):
    again = question_documents(3, LENGTH, "train", spacing=128, align=ALIGN)
    assert [d.input_ids for d, _ in again] == [d.input_ids for d, _ in documents]
    other = question_documents(3, LENGTH, "validation", spacing=128, align=ALIGN)
    assert all(a.input_ids != b.input_ids for (a, _), (b, _) in zip(documents, other))
    for document, questions in documents:
        last = questions[-1]
        assert len(document.input_ids) == LENGTH + last.answer_tokens + ALIGN and last.end == LENGTH - 1
        assert len(questions) == 3 and all(q.end % ALIGN == (LENGTH - 1) % ALIGN for q in questions)


def test_a_dump_in_blocks_stops_at_its_deadline_and_resumes(model, documents, tmp_path):
    plain = [document for document, _ in documents]
    config = dump_config(model, 4)
    assert not dump_in_blocks(model, plain, tmp_path, config, "smoke", block_size=2, max_minutes=0)
    blocks = block_directories(tmp_path, len(plain), 2)
    assert len(blocks) == 2 and not any(is_complete(block) for block in blocks)
    assert dump_in_blocks(model, plain, tmp_path, config, "smoke", block_size=2)
    assert all(is_complete(block) for block in blocks)
    assert sum(len(LabelShards(block).documents) for block in blocks) == 3


def test_only_question_and_answer_triggers_are_kept(raw, tmp_path):
    root, questions = raw
    select_labels(block_directories(root / "tau4", 3, 2), tmp_path, questions, tau=4)
    shards = LabelShards(tmp_path)
    assert shards.manifest["labels"]["tau"] == 4 and len(shards.documents) == 3
    for index, document in enumerate(shards.documents):
        expected = [p for q in questions[document.doc_id] for p in q.trigger_positions(4)]
        assert shards.load(index)["positions"].tolist() == expected
    assert read_questions(tmp_path) == {doc_id: list(asked) for doc_id, asked in questions.items()}


def test_labels_widened_from_a_finer_dump_equal_a_dump_at_that_tau(raw, tmp_path):
    root, questions = raw
    select_labels(block_directories(root / "tau4", 3, 2), tmp_path / "widened", questions, tau=8)
    select_labels([root / "tau8"], tmp_path / "direct", questions, tau=8)
    widened, direct = LabelShards(tmp_path / "widened"), LabelShards(tmp_path / "direct")
    for index in range(3):
        a, b = widened.load(index), direct.load(index)
        assert sorted(a) == sorted(b)
        assert all(torch.equal(a[name], b[name]) for name in a), [n for n in a if not torch.equal(a[n], b[n])]
        assert a["labels/indices"].numel() > 0


def test_labels_at_another_vote_from_the_dumps_votes_equal_a_dump_at_that_vote(raw, tmp_path):
    root, questions = raw
    select_labels(block_directories(root / "tau4", 3, 2), tmp_path / "revoted", questions, tau=8, vote=2)
    select_labels([root / "tau8-vote2"], tmp_path / "direct", questions, tau=8)
    revoted, direct = LabelShards(tmp_path / "revoted"), LabelShards(tmp_path / "direct")
    assert revoted.manifest["labels"]["vote_applied"] == 2 == direct.manifest["labels"]["vote_applied"]
    select_labels([root / "tau8"], tmp_path / "vote1", questions, tau=8)
    fewer = 0
    for index in range(3):
        a, b, one = revoted.load(index), direct.load(index), LabelShards(tmp_path / "vote1").load(index)
        assert sorted(a) == sorted(b)
        assert all(torch.equal(a[name], b[name]) for name in a), [n for n in a if not torch.equal(a[n], b[n])]
        fewer += one["labels/indices"].numel() - a["labels/indices"].numel()
    assert fewer > 0  # vote 2 is a real filter here, not vote 1 again


def test_one_pass_over_the_dump_selects_every_vote_as_one_pass_each_does(raw, tmp_path):
    root, questions = raw
    blocks = block_directories(root / "tau4", 3, 2)
    targets = {None: tmp_path / "own", 1: tmp_path / "vote1", 2: tmp_path / "vote2"}
    manifests = select_label_sets(blocks, targets, questions, tau=8)
    for vote, target in targets.items():
        alone = select_labels(blocks, tmp_path / "alone", questions, tau=8, vote=vote)
        assert manifests[vote] == json.loads((target / MANIFEST).read_text())
        assert {**manifests[vote], "shards": None} == {**alone, "shards": None}
        assert (target / QUESTIONS).read_text() == (tmp_path / "alone" / QUESTIONS).read_text()
        together, one = LabelShards(target), LabelShards(tmp_path / "alone")
        for index in range(3):
            a, b = together.load(index), one.load(index)
            assert sorted(a) == sorted(b) and all(torch.equal(a[name], b[name]) for name in a)
    sizes = [LabelShards(target).load(0)["labels/indices"].numel() for target in targets.values()]
    assert sizes[1] > sizes[2]  # the votes' label sets differ: each went to its own directory


def test_window_evidence_labels_mark_only_the_statements_each_triggers_window_reads(raw, tmp_path):
    root, questions = raw
    blocks = block_directories(root / "tau4", 3, 2)
    targets = {EVIDENCE: tmp_path / "whole", EVIDENCE_WINDOW: tmp_path / "window"}
    manifests = select_label_sets(blocks, targets, questions, tau=8)
    assert manifests[EVIDENCE_WINDOW]["labels"]["source"] == EVIDENCE_WINDOW
    whole, window = LabelShards(targets[EVIDENCE]), LabelShards(targets[EVIDENCE_WINDOW])
    narrower = 0
    for index, document in enumerate(window.documents):
        a, b = whole.load(index), window.load(index)
        assert torch.equal(a["positions"], b["positions"]) and torch.equal(a["used/indices"], b["used/indices"])
        expected = {}
        for question in questions[document.doc_id]:
            windows = question.window_evidence_chunks(8, window.compress_rate)
            for position, chunks in zip(question.trigger_positions(8), windows):
                expected[position] = sorted(c for c in chunks if c < (position + 1) // window.compress_rate)
        for row, position in enumerate(b["positions"].tolist()):
            marked = b["labels/indices"][b["labels/indptr"][row] : b["labels/indptr"][row + 1]].tolist()
            all_evidence = a["labels/indices"][a["labels/indptr"][row] : a["labels/indptr"][row + 1]].tolist()
            assert marked == expected[position] and set(marked) <= set(all_evidence)
            narrower += len(marked) < len(all_evidence)
    assert narrower > 0  # the windows of long answers read fewer statements than the whole answer
    # as the scores, either set holds every window's evidence; only the whole set holds all of it at a question
    as_scores = {labels: gate_metrics(None, target, budget=1.0, recency_chunks=0, sink_chunks=0)["all"]
                 for labels, target in targets.items()}
    assert as_scores[EVIDENCE]["paper_window_evidence_recall"] == 1.0 == as_scores[EVIDENCE]["paper_evidence_recall"]
    assert as_scores[EVIDENCE_WINDOW]["paper_window_evidence_recall"] == 1.0
    assert as_scores[EVIDENCE_WINDOW]["paper_evidence_recall"] < 1.0


@pytest.mark.parametrize("vote, message", [(0, "not a number of CSA layers"), (8, "not a number of CSA layers")])
def test_a_vote_the_backbone_cannot_give_is_an_error(raw, tmp_path, vote, message):
    root, questions = raw
    with pytest.raises(ValueError, match=message):
        select_labels([root / "tau8"], tmp_path, questions, tau=8, vote=vote)


def test_a_dump_without_votes_cannot_be_revoted(raw, tmp_path):
    root, questions = raw
    shutil.copytree(root / "tau8", tmp_path / "old")
    for path in (tmp_path / "old").glob("*.safetensors"):  # as written before the votes were stored
        with safe_open(str(path), framework="pt") as shard:
            kept = {name: shard.get_tensor(name) for name in shard.keys() if "/votes/" not in name}  # noqa: SIM118
            metadata = shard.metadata()
        save_file(kept, str(path), metadata=metadata)
    select_labels([tmp_path / "old"], tmp_path / "plain", questions, tau=8)  # the dump's own vote still works
    with pytest.raises(ValueError, match="stores no votes"):
        select_labels([tmp_path / "old"], tmp_path / "revoted", questions, tau=8, vote=2)


def test_a_tau_the_dump_cannot_make_is_an_error(raw, tmp_path):
    root, questions = raw
    with pytest.raises(ValueError, match="not a multiple"):
        select_labels([root / "tau8"], tmp_path, questions, tau=12)


def test_the_gate_selects_everything_at_threshold_zero_and_holds_the_budget(raw, model, tmp_path):
    root, questions = raw
    select_labels(block_directories(root / "tau4", 3, 2), tmp_path, questions, tau=4)
    indexer = MemoryIndexerModel.from_backbone(model, num_heads=2, rank=8)
    everything = gate_metrics(indexer, tmp_path, budget=1.0, threshold=0.0, recency_chunks=0, sink_chunks=0)
    assert everything["all"]["paper_evidence_recall"] == 1.0 and everything["all"]["paper_used_recall"] == 1.0
    assert everything["all"]["paper_window_evidence_recall"] == 1.0
    assert everything["all"]["paper_resident_fraction"] == 1.0
    capped = gate_metrics(indexer, tmp_path, budget=0.1, threshold=0.0, recency_chunks=2, sink_chunks=1)
    assert set(capped) == {"all", *(q.task for asked in questions.values() for q in asked)}
    assert 0.05 < capped["all"]["budget_resident_fraction"] <= 0.1 + 1e-9
    assert capped["all"]["question_triggers"] == 9 and 0.0 <= selection_score(capped) <= 1.0


def test_the_labels_as_scores_keep_exactly_the_labelled_chunks(raw, tmp_path):
    root, questions = raw
    select_labels(block_directories(root / "tau4", 3, 2), tmp_path, questions, tau=4)
    shards, asked_at = LabelShards(tmp_path), read_questions(tmp_path)
    density, evidence = [], []
    for index, document in enumerate(shards.documents):
        data, ends = shards.load(index), {q.end: q for q in asked_at[document.doc_id]}
        indptr, indices = data["labels/indptr"], data["labels/indices"]
        for row, position in enumerate(data["positions"].tolist()):
            visible = (position + 1) // shards.compress_rate
            labelled = set(indices[indptr[row] : indptr[row + 1]].tolist())
            density.append(len(labelled) / visible)
            asked = ends[position].evidence_chunks(shards.compress_rate) if position in ends else []
            made = [chunk for chunk in asked if chunk < visible]
            if made:
                evidence.append(sum(c in labelled for c in made) / len(made))
    labels = gate_metrics(None, tmp_path, budget=0.1, recency_chunks=0, sink_chunks=0)["all"]
    assert 0.0 < labels["paper_resident_fraction"] < 1.0 and evidence
    assert labels["paper_resident_fraction"] == pytest.approx(sum(density) / len(density))
    assert labels["paper_evidence_recall"] == pytest.approx(sum(evidence) / len(evidence))


def test_a_scorer_is_gated_as_an_indexer_is(raw, tmp_path):
    root, questions = raw
    select_labels(block_directories(root / "tau4", 3, 2), tmp_path, questions, tau=4)
    settings = dict(budget=0.1, recency_chunks=0, sink_chunks=0)
    as_labels = gate_metrics(None, tmp_path, scorer=lambda doc_id, data, rows: label_scores(data, rows), **settings)
    assert as_labels == gate_metrics(None, tmp_path, **settings)
    seen = []

    def wants_nothing(doc_id, data, rows):  # below the threshold everywhere: the paper's set keeps no chunk
        seen.append(doc_id)
        return 0.4 * torch.rand_like(label_scores(data, rows))

    nothing = gate_metrics(None, tmp_path, scorer=wants_nothing, **settings)["all"]
    assert nothing["paper_resident_fraction"] == 0.0 < as_labels["all"]["paper_resident_fraction"]
    assert seen == [document.doc_id for document in LabelShards(tmp_path).documents]
    with pytest.raises(ValueError, match="not both"):
        gate_metrics(object(), tmp_path, scorer=wants_nothing, **settings)
