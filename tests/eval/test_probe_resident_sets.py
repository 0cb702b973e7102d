"""examples/probe_resident_sets.py: the oracle lookahead uncapped reproduces the stock answers, budgets hold fewer
chunks, the evidence oracle keeps the evidence (and more, with filler or other statements), bad settings are
refused."""

import json

import pytest
import torch

from fm_transformers.eval.backbone import build_eval_backbone, eval_backbone_config
from fm_transformers.eval.catalog import evaluation_examples
from fm_transformers.eval.long_tasks import evidence_chunks, question_start, statement_chunks


def test_the_probe_reproduces_the_stock_answers_uncapped_and_holds_less_under_a_budget(tmp_path, load_example):
    build_eval_backbone(eval_backbone_config("paper-smoke"), seed=0).save_pretrained(tmp_path / "paper")
    out = tmp_path / "probe.json"
    results = load_example("probe_resident_sets.py").main([
        str(tmp_path / "paper"), "--length", "320", "--answer-tokens", "16", "--tau", "4", "--examples", "2",
        "--budgets", "0.25,none", "--tails", "2", "--fillers", "6", "--out", str(out),
    ])
    assert set(results) == {"long_needle", "qa_block", "long_chain"}
    for task, rows in results.items():
        assert rows["stock"]["same_as_stock"] == 1.0
        assert rows["oracle budget None"]["same_as_stock"] == 1.0  # every pick resident: the stock answer
        assert rows["oracle budget 0.25"]["resident_share"] < rows["oracle budget None"]["resident_share"]
        assert 0.0 < rows["evidence tail 2"]["resident_share"] < 1.0
        for kind in ("filler", "other statements", "most picked"):  # the evidence and more
            assert rows["evidence tail 2"]["resident_share"] < rows[f"evidence + 6 {kind}"]["resident_share"] < 1.0
        window = rows["window evidence tail 2"]["resident_share"]  # a window's evidence: part of the whole's
        whole = rows["evidence tail 2"]["resident_share"]
        assert 0.0 < window <= whole and (window < whole or task == "long_needle")  # its answer: one item
        assert window < rows["window evidence + 6 filler"]["resident_share"] < 1.0
        assert 0.0 < rows["touched"]["per_layer"] <= rows["touched"]["pooled"] <= 1.0
        assert sum(rows["picks"].values()) == pytest.approx(1.0) and rows["picks"]["tail"] > 0.0
    assert json.loads(out.read_text())["results"] == json.loads(json.dumps(results))


@pytest.mark.parametrize("task", ["qa_block", "long_chain"])
def test_the_added_chunks_are_filler_or_other_statements_before_the_question_and_the_tail(task, load_example):
    examples = evaluation_examples(task, 2048, 2, seed=5)
    added = load_example("probe_resident_sets.py").added_chunks(examples, 4, 24, 16)
    for index, example in enumerate(examples):
        statements, evidence = set(statement_chunks(example, 4)), set(evidence_chunks(example, 4))
        last = (min(question_start(example), 2048 - 16 * 4) - 4) // 4  # the last chunk wholly before both
        filler, others = added["filler"][index], added["other statements"][index]
        assert len(filler) == len(set(filler)) == 24 and len(others) == len(set(others)) == 24
        assert all(0 < chunk <= last and chunk not in statements for chunk in filler)
        assert all(0 < chunk <= last and chunk in statements - evidence for chunk in others)
    everything = load_example("probe_resident_sets.py").added_chunks(examples, 4, 10**6, 16)["filler"]
    last = (min(question_start(examples[0]), 2048 - 16 * 4) - 4) // 4
    assert sorted(everything[0]) == [c for c in range(1, last + 1) if c not in statement_chunks(examples[0], 4)]


def test_picks_are_told_apart_by_what_their_chunk_holds(load_example):
    probe = load_example("probe_resident_sets.py")
    (example,) = evaluation_examples("qa_block", 2048, 1, seed=5)
    evidence, statements = evidence_chunks(example, 4), set(statement_chunks(example, 4))
    other = min(statements - set(evidence))
    filler = next(c for c in range(1, 500) if c not in statements)
    question = question_start(example) // 4 + 1
    assert question not in statements and question < 512
    # picks at the 100th forward only: chunks up to (2048 + 100) // 4 = 537 made, the 16-chunk tail from 521; the
    # answer's from 513
    picks = torch.tensor([[evidence[0], other, filler, 0, 530, question, 513, -1]])
    shares = probe.pick_kinds([torch.full_like(picks, -1)] * 99 + [picks], [example], 4, 16)
    assert shares == pytest.approx(dict.fromkeys(probe.PICK_KINDS, 1 / 7))


def test_the_most_picked_others_leave_out_the_evidence_the_sink_and_the_tail(load_example):
    probe = load_example("probe_resident_sets.py")
    # two forwards of one sequence: chunk 5 picked 3 times, 7 twice, 2 and 9 once each; 3 is evidence, 0 the sink,
    # 12 in the tail (from 10)
    steps = [torch.tensor([[5, 5, 3, 3, 3, 0, 0, 12, 12, 12]]), torch.tensor([[5, 7, 7, 2, 9, -1, 0, 12, 3, 3]])]
    assert probe.most_picked_others(steps, [torch.tensor([3, 4])], 3, 10) == [[5, 7, 9]]  # 9 over 2: the newer
    assert probe.most_picked_others(steps, [torch.tensor([3, 4])], 10, 10) == [[5, 7, 9, 2]]  # picked chunks only


@pytest.mark.parametrize("flag", [["--budgets", "0.1,all"], ["--tails", "1.5"]])
def test_the_probe_refuses_settings_it_cannot_read(flag, capsys, load_example):
    with pytest.raises(SystemExit) as stopped:
        load_example("probe_resident_sets.py").parse_args(["backbone", *flag])
    assert stopped.value.code == 2 and "--budgets takes fractions" in capsys.readouterr().err
