"""The comparison's rows on the CPU, on an untrained paper-layout backbone of smoke size: properties that hold for
any weights, so each of these tests fails when the machinery is wrong (not an accuracy of an untrained model)."""

import importlib.util
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import fm_transformers as fm
from fm_transformers.eval import build_eval_backbone, eval_backbone_config
from fm_transformers.eval.catalog import evaluation_examples
from fm_transformers.eval.comparison import decode_batch, run_comparison
from fm_transformers.eval.long_tasks import expected_triggers
from fm_transformers.eval.methods import Row, RowSettings, paper_rows
from fm_transformers.layout import csa_layers

LENGTH, ANSWER, TAU = 192, 16, 4
SETTINGS = RowSettings(tau=TAU, recency_chunks=2, sink_chunks=1, budget=0.2)


@pytest.fixture(scope="module")
def model_and_indexer():
    torch.manual_seed(0)
    model = build_eval_backbone(eval_backbone_config("paper-smoke"), seed=0).eval()
    fm.enable_bounded_prefill(model)  # full prefills as LSA does
    indexer = fm.attach_memory_indexer(model, fm.MemoryIndexerModel.from_backbone(model, num_heads=2, rank=8))
    return model, indexer


def examples(count=1, tasks=("long_needle", "qa_block")):
    return [e for task in tasks for e in evaluation_examples(task, LENGTH, count, seed=1, answer_tokens=ANSWER)]


def rows_named(indexer, settings=SETTINGS, paging=True):
    return {row.name: row for row in paper_rows(indexer, settings, paging=paging)}


def generate_rows(model, names, rows, example, graph=False):
    shared, out = {"batch": 0}, {}
    input_ids = torch.tensor([example.input_ids])
    with torch.no_grad():
        for name in names:
            out[name] = decode_batch(model, rows[name], input_ids, len(example.answer), shared, graph)
    return out


# graph=True: the fixed-shape step of decode_graph.py, which CUDA captures and replays, run eagerly here
@pytest.mark.parametrize("graph", [False, True])
def test_lsa_keeping_every_chunk_generates_the_tokens_of_full_across_several_recalls(model_and_indexer, graph):
    model, indexer = model_and_indexer
    rows = rows_named(indexer, replace(SETTINGS, threshold=0.0))  # a sigmoid score is always >= 0
    for example in examples():
        out = generate_rows(model, ["full", "lsa"], rows, example, graph)
        (full, _), (lsa, measures) = out["full"], out["lsa"]
        assert measures["triggers"] == expected_triggers(ANSWER, TAU) == 4
        assert lsa.tolist() == full.tolist()


@pytest.mark.parametrize("graph", [False, True])
def test_the_oracle_lookahead_without_a_budget_generates_the_tokens_of_full(model_and_indexer, graph):
    """Its sets hold every chunk the stock top-k picks in each window: level 2 then picks what full picks. A set
    taken from the wrong window would leave picks out and change the tokens."""
    model, indexer = model_and_indexer
    rows = rows_named(indexer, replace(SETTINGS, recency_chunks=0, sink_chunks=0, budget=1.0))
    for example in examples(2):
        out = generate_rows(model, ["full", "oracle lookahead"], rows, example, graph)
        (full, _), (oracle, measures) = out["full"], out["oracle lookahead"]
        assert oracle.tolist() == full.tolist()
        assert measures["csa_device_bytes"] < measures["full_csa_bytes"]  # it did leave chunks out


@pytest.mark.parametrize("graph", [False, True])
def test_matched_baselines_hold_lsas_bytes_within_one_chunk_example_by_example(model_and_indexer, graph):
    model, indexer = model_and_indexer
    rows = [row for row in paper_rows(indexer, SETTINGS, paging=False) if row.name != "oracle lookahead"]
    records = run_comparison(model, examples(2), rows, batch_size=1, progress=False, graph=graph)
    config = model.config
    chunk_bytes = len(csa_layers(config)) * (config.head_dim + config.index_head_dim) * 4  # fp32
    for lsa, recency, random in zip(records["lsa"], records["recency (matched)"], records["random (matched)"]):
        assert 0 <= lsa["csa_device_bytes"] - recency["csa_device_bytes"] < chunk_bytes
        assert recency["csa_device_bytes"] == random["csa_device_bytes"]
        assert lsa["triggers"] == recency["triggers"] == expected_triggers(ANSWER, TAU)
    assert {r["csa_device_bytes"] for r in records["lsa"]} != {r["csa_device_bytes"] for r in records["lsa (budget)"]}


def test_budgeted_rows_keep_the_budget_and_the_stock_row_reports_no_lsa_counters(model_and_indexer):
    model, indexer = model_and_indexer
    rows = rows_named(indexer)
    out = generate_rows(model, ["full", "lsa (budget)"], rows, examples()[0])
    (_, full), (_, budgeted) = out["full"], out["lsa (budget)"]
    assert full["triggers"] is None and full["csa_device_bytes"] == full["full_csa_bytes"] > 0
    assert full["prefill_peak_bytes"] is None and full["host_syncs"] is None  # measured on CUDA only
    assert budgeted["csa_device_bytes"] < 0.4 * budgeted["full_csa_bytes"]


def test_native_paging_scores_its_whole_history_at_every_step_of_every_refresh_layer(model_and_indexer):
    model, indexer = model_and_indexer
    rows = rows_named(indexer)
    out = generate_rows(model, ["full", "native paging"], rows, examples()[0])
    _, paging = out["native paging"]
    layers = len(indexer.config.layers)
    assert paging["refresh_checks"] == (ANSWER - 1) * layers  # every decode step, every refresh layer
    assert paging["refresh_scored_chunks"] >= paging["refresh_checks"] * (LENGTH // 4)
    assert paging["chunks_fetched"] > 0


SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "compare_methods.py"
SMOKE = ["--smoke", "--device", "cpu", "--examples", "1", "--answer-tokens", "8", "--tau", "4", "--batch-size", "1", "--tasks", "long_needle"]


def run_script(*flags, check=True):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *flags], capture_output=True, text=True, timeout=600, check=check,
        env={"OMP_NUM_THREADS": "1", "PATH": ""},
    )


def test_the_script_tunes_on_one_draw_evaluates_another_in_parts_and_joins_them(tmp_path):
    tuned = tmp_path / "tuned.json"
    run_script(*SMOKE, "--tune", "--seed", "0", "--lengths", "384", "--tails", "2,4", "--thresholds", "0", "--out", str(tuned))
    chosen = json.loads(tuned.read_text())["tuning"]["chosen"]
    assert chosen["recency_chunks"] in (2, 4) and chosen["budget_recency_chunks"] in (2, 4)
    refused = run_script(*SMOKE, "--settings", str(tuned), "--seed", "0", "--lengths", "384", "--out", str(tmp_path / "x.json"), check=False)
    assert refused.returncode != 0 and "evaluate on another draw" in refused.stderr
    for first in (0, 1):
        run_script(*SMOKE, "--settings", str(tuned), "--seed", "1", "--lengths", "384", "--first", str(first), "--no-paging",
                   "--out", str(tmp_path / f"part{first}.json"))
    joined = tmp_path / "joined.json"
    done = run_script("--merge", str(tmp_path / "part0.json"), str(tmp_path / "part1.json"), "--out", str(joined), "--plot", str(tmp_path / "p.png"))
    result = json.loads(joined.read_text())
    assert [r["index"] for r in result["records"]["384"]["lsa"]] == [0, 1]
    assert result["summary"]["384"]["lsa"]["examples"] == 2 and result["tuning"]["seed"] == 0
    assert "recency (matched)" in done.stdout and (tmp_path / "p.png").stat().st_size > 0
    again = run_script("--merge", str(tmp_path / "part0.json"), str(tmp_path / "part0.json"), "--out", str(joined), check=False)
    assert again.returncode != 0 and "appears in more than one part" in again.stderr


def test_the_plot_draws_a_row_at_the_lengths_it_ran_only(tmp_path):
    spec = importlib.util.spec_from_file_location("compare_methods", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    interval = {"low": -0.3, "high": -0.1}
    row = {"mean_accuracy": 0.2, "mean_token_accuracy": 0.4, "vs_full": interval, "tokens_vs_full": interval}
    full = {"mean_accuracy": 0.5, "mean_token_accuracy": 0.7, "vs_full": None, "tokens_vs_full": None}
    summary = {"2048": {"full": full, "lsa": row, "native paging": row}, "4096": {"full": full, "lsa": row}}
    figure = script.plot(summary, str(tmp_path / "p.png"))
    drawn = {bars.get_label(): list(bars.lines[0].get_xdata()) for bars in figure.axes[0].containers}
    assert drawn == {"full": [2048, 4096], "lsa": [2048, 4096], "native paging": [2048]}
    assert (tmp_path / "p.png").stat().st_size > 0
