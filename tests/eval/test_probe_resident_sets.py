"""examples/probe_resident_sets.py: the oracle lookahead uncapped reproduces the stock answers, budgets hold fewer
chunks, the evidence oracle keeps the evidence, bad settings are refused."""

import json

import pytest

from fm_transformers.eval.backbone import build_eval_backbone, eval_backbone_config


def test_the_probe_reproduces_the_stock_answers_uncapped_and_holds_less_under_a_budget(tmp_path, load_example):
    build_eval_backbone(eval_backbone_config("paper-smoke"), seed=0).save_pretrained(tmp_path / "paper")
    out = tmp_path / "probe.json"
    results = load_example("probe_resident_sets.py").main([
        str(tmp_path / "paper"), "--length", "320", "--answer-tokens", "16", "--tau", "4", "--examples", "2",
        "--budgets", "0.25,none", "--tails", "2", "--out", str(out),
    ])
    assert set(results) == {"long_needle", "qa_block", "long_chain"}
    for rows in results.values():
        assert rows["stock"]["same_as_stock"] == 1.0
        assert rows["oracle budget None"]["same_as_stock"] == 1.0  # every pick resident: the stock answer
        assert rows["oracle budget 0.25"]["resident_share"] < rows["oracle budget None"]["resident_share"]
        assert 0.0 < rows["evidence tail 2"]["resident_share"] < 1.0
        assert 0.0 < rows["touched"]["per_layer"] <= rows["touched"]["pooled"] <= 1.0
    assert json.loads(out.read_text())["results"] == json.loads(json.dumps(results))


@pytest.mark.parametrize("flag", [["--budgets", "0.1,all"], ["--tails", "1.5"]])
def test_the_probe_refuses_settings_it_cannot_read(flag, capsys, load_example):
    with pytest.raises(SystemExit) as stopped:
        load_example("probe_resident_sets.py").parse_args(["backbone", *flag])
    assert stopped.value.code == 2 and "--budgets takes fractions" in capsys.readouterr().err
