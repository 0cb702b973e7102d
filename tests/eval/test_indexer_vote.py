"""examples/train_eval_indexer.py --votes, --evidence-labels and --window-evidence-labels: one dump serves every
candidate label set, validation chooses among label sets and learning rates by the rule gate.py states, and a vote
the backbone cannot give is a clear error before any work."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fm_transformers.eval import build_eval_backbone, eval_backbone_config
from fm_transformers.eval.gate import BYTES_TARGET, choose_candidate
from fm_transformers.eval.label_selection import read_questions
from fm_transformers.training import LabelShards

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "train_eval_indexer.py"
SMALL = ["--device", "cpu", "--length", "320", "--spacing", "128", "--align", "8", "--dump-tau", "4",
         "--train-docs", "2", "--validation-docs", "1", "--test-docs", "1", "--block-size", "2"]
TRAIN = ["--stage", "train", "--tau", "8", "--steps", "3", "--batch-size", "4", "--num-heads", "2", "--rank", "8",
         "--recency-chunks", "2"]


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    path = tmp_path_factory.mktemp("paper-smoke") / "backbone"
    build_eval_backbone(eval_backbone_config("paper-smoke"), seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dumped(backbone, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("indexer")
    done = run(backbone, workdir, "--stage", "dump")
    assert done.returncode == 0, done.stderr[-2000:]
    return workdir


def run(backbone, workdir, *flags):
    command = [sys.executable, str(SCRIPT), "--backbone", str(backbone), "--workdir", str(workdir)]
    return subprocess.run(command + SMALL + list(flags), capture_output=True, text=True, timeout=600)


def test_one_dump_trains_every_candidate_vote_and_validation_chooses(backbone, dumped):
    manifest = json.loads((dumped / "raw" / "train" / "block-0000" / "manifest.json").read_text())
    assert manifest["labels"]["vote"] == 1  # paper-smoke has 7 CSA layers: 3 of 21 scaled is 1
    done = run(backbone, dumped, *TRAIN, "--votes", "1,3", "--lrs", "1e-3")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((dumped / "tau8" / "gate.json").read_text())
    assert set(report["validation"]) == {"vote1-lr0.001", "vote3-lr0.001"}
    assert (report["chosen"], report["meets_resident_target"]) == choose_candidate(report["validation"])
    assert report["chosen"] == f"{report['chosen_labels']}-lr{report['chosen_lr']}"
    for vote in (1, 3):
        labels = json.loads((dumped / "tau8" / f"vote{vote}" / "train" / "manifest.json").read_text())["labels"]
        assert labels["vote_applied"] == vote and labels["tau"] == 8
    assert report["chosen_start"] == "random"
    assert f"{report['chosen_labels']}, lr {report['chosen_lr']}, random start, chosen on validation" in done.stdout


def test_evidence_labels_are_more_candidates_marking_each_questions_evidence(backbone, dumped, tmp_path):
    shutil.copytree(dumped / "raw", tmp_path / "raw")
    flags = ["--votes", "2", "--evidence-labels", "--window-evidence-labels", "--lrs", "1e-3"]
    done = run(backbone, tmp_path, *TRAIN, *flags)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "tau8" / "gate.json").read_text())
    assert set(report["validation"]) == {"vote2-lr0.001", "evidence-lr0.001", "evidence-window-lr0.001"}
    assert set(report["labels_on_test"]) == {"vote2", "evidence", "evidence-window"}
    window = json.loads((tmp_path / "tau8" / "evidence-window" / "train" / "manifest.json").read_text())
    assert window["labels"]["source"] == "evidence-window"
    # a window's evidence is part of the question's: as the scores, it keeps no more of the chunks
    narrower, whole = (report["labels_on_test"][labels]["all"] for labels in ("evidence-window", "evidence"))
    assert 0.0 < narrower["paper_resident_fraction"] <= whole["paper_resident_fraction"]
    assert (report["chosen"], report["meets_resident_target"]) == choose_candidate(report["validation"])
    # as the scores, the evidence labels hold every evidence chunk made at a question and nothing else
    ceiling = report["labels_on_test"]["evidence"]["all"]
    assert ceiling["paper_evidence_recall"] == 1.0 and 0.0 < ceiling["paper_resident_fraction"] < 1.0
    selected = tmp_path / "tau8" / "evidence" / "train"
    assert json.loads((selected / "manifest.json").read_text())["labels"]["source"] == "evidence"
    shards, questions = LabelShards(selected), read_questions(selected)
    for index, document in enumerate(shards.documents):
        data = shards.load(index)
        asked = {p: q for q in questions[document.doc_id] for p in q.trigger_positions(8)}
        indptr, indices = data["labels/indptr"], data["labels/indices"]
        for row, position in enumerate(data["positions"].tolist()):
            visible = (position + 1) // shards.compress_rate
            expected = sorted(c for c in set(asked[position].evidence_chunks(shards.compress_rate)) if c < visible)
            assert indices[indptr[row] : indptr[row + 1]].tolist() == expected


@pytest.mark.parametrize("votes, message", [("0", "--votes must be at least 1"), ("2,8", "--votes 8 asks more CSA"),
                                            ("two", "--votes must be CSA layer counts")])
def test_a_vote_the_backbone_cannot_give_is_a_clear_error(backbone, dumped, votes, message):
    refused = run(backbone, dumped, *TRAIN, "--tau", "4", "--votes", votes)
    assert refused.returncode in (1, 2) and message in refused.stderr and "Traceback" not in refused.stderr
    assert not (dumped / "tau4").exists()


def metrics(resident: float, recall: float, budget_recall: float | None = None) -> dict:
    recalls = {"paper": recall, "budget": recall if budget_recall is None else budget_recall}
    task = {f"{selection}_{metric}": recalls[selection] for selection in recalls
            for metric in ("evidence_recall", "window_evidence_recall", "used_recall")}
    return {"all": {**task, "paper_resident_fraction": resident}, "qa_block": task}


def test_validation_takes_the_best_score_among_candidates_that_meet_the_resident_target():
    candidates = {"dense": metrics(0.9, 0.99), "good": metrics(0.1, 0.8), "sparse": metrics(0.02, 0.4)}
    assert choose_candidate(candidates) == ("good", True)
    # none meets it: the best ranking at the budget, whatever the paper sets' sizes and recalls
    wide = {"small": metrics(0.2, 0.3, 0.1), "ranks": metrics(0.4, 0.7, 0.3), "recalls": metrics(0.9, 0.99, 0.2)}
    assert choose_candidate(wide) == ("ranks", False)
    assert choose_candidate({"edge": metrics(BYTES_TARGET, 0.5)}) == ("edge", True)
    with pytest.raises(ValueError, match="no candidate"):
        choose_candidate({})


def test_validation_ranks_by_the_windows_evidence_not_the_whole_answers_at_its_question():
    whole, window = metrics(0.3, 0.5, 0.2), metrics(0.3, 0.5, 0.2)
    for task in ("all", "qa_block"):
        whole[task].update(budget_evidence_recall=0.6, budget_window_evidence_recall=0.3)
        window[task].update(budget_evidence_recall=0.2, budget_window_evidence_recall=0.7)
    assert choose_candidate({"whole": whole, "window": window}) == ("window", False)


def test_a_train_stage_stopped_by_its_time_limit_goes_on_where_it_stopped(backbone, dumped, tmp_path):
    """--max-minutes starts no candidate that would not fit: status 75, and the rerun keeps the selected labels
    and every trained candidate (as a device call cut at its limit needs)."""
    shutil.copytree(dumped / "raw", tmp_path / "raw")
    flags = [*TRAIN, "--tau", "4", "--votes", "1,2", "--lrs", "1e-3"]
    stopped = run(backbone, tmp_path, *flags, "--max-minutes", "0")
    assert stopped.returncode == 75 and "run again to go on" in stopped.stdout, stopped.stderr[-2000:]
    selected = tmp_path / "tau4" / "vote2" / "train" / "manifest.json"
    written = selected.stat().st_mtime_ns
    assert not (tmp_path / "tau4" / "vote1-lr0.001").exists()  # no candidate began
    done = run(backbone, tmp_path, *flags, "--max-minutes", "10")
    assert done.returncode == 0, done.stderr[-2000:]
    assert selected.stat().st_mtime_ns == written  # the labels selected before the stop were kept
    assert set(json.loads((tmp_path / "tau4" / "gate.json").read_text())["validation"]) == {"vote1-lr0.001", "vote2-lr0.001"}
