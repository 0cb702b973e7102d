"""The Full / LSA / recency / random comparison runs end to end on the CPU at short context (the CI version)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fm_transformers as fm
from fm_transformers.eval import TASK_NAMES, build_eval_backbone, eval_backbone_config, evaluate_accuracy, make_examples
from fm_transformers.eval.methods import comparison_methods


@pytest.fixture(scope="module")
def backbone_and_indexer():
    """The smoke backbone, its stock-cache prefill the bounded one LSA runs (`enable_bounded_prefill`): "full"
    and the LSA methods then compute the prompt alike and differ only in decode."""
    model = build_eval_backbone(eval_backbone_config("smoke"), seed=0).eval()
    fm.enable_bounded_prefill(model)
    return model, fm.MemoryIndexerModel.from_backbone(model, layers=[2, 4], num_heads=4, rank=16)


def run(model, indexer, config, length=128, refresh_config=None):
    fm.attach_memory_indexer(model, indexer)
    examples = [example for task in TASK_NAMES[:2] for example in make_examples(task, length, 1, seed=1)]
    methods = comparison_methods(indexer, config, refresh_config=refresh_config)
    return {
        method.name: (evaluate_accuracy(model, examples, method.generate, progress=False), method.mean_csa_bytes(), method)
        for method in methods
    }


def test_lsa_keeping_everything_generates_the_tokens_of_full(backbone_and_indexer):
    """At threshold 0.0 every chunk reaches the threshold (a memory-indexer score is a sigmoid), so LSA keeps the
    whole history resident and must decode token for token as the stock cache, across several recalls."""
    model, indexer = backbone_and_indexer
    fm.attach_memory_indexer(model, indexer)
    methods = {method.name: method for method in comparison_methods(indexer, {"tau": 4, "threshold": 0.0})}
    for task in TASK_NAMES[:2]:
        input_ids = torch.tensor([make_examples(task, 128, 1, seed=1)[0].input_ids])
        with torch.no_grad():
            full = methods["full"].generate(model, input_ids, 16)
            lsa = methods["lsa"].generate(model, input_ids, 16)
        assert full.shape[1] > 4  # decoding went past the first lookahead window
        assert lsa.tolist() == full.tolist()


def test_budgeted_methods_hold_less_than_full_and_the_same_budget(backbone_and_indexer):
    results = run(*backbone_and_indexer, {"tau": 4, "threshold": 0.5, "resident_budget": 0.15, "recency_chunks": 2, "sink_chunks": 1})
    full_bytes = results["full"][1]
    assert all(0 < results[name][1] < full_bytes for name in ("lsa", "recency", "random"))
    assert results["recency"][1] == results["random"][1]


def test_refresh_rows_fetch_inside_the_window_and_hold_less_than_full(backbone_and_indexer):
    config = {"tau": 16, "threshold": 0.5, "resident_budget": 0.15, "recency_chunks": 2, "sink_chunks": 1}
    results = run(*backbone_and_indexer, config, length=256, refresh_config={"refresh_layers": [2, 7], "resident_budget": 0.1})
    assert list(results) == ["full", "lsa", "lsa+refresh", "refresh only", "recency", "random"]
    full_bytes = results["full"][1]
    # answers are shorter than tau: LSA's only recall (after prefill) finds its chunks still on the device,
    # so whatever the refresh rows fetched, refreshes inside the window fetched it
    assert results["lsa"][2].fetched_per_token() == 0
    for name in ("lsa+refresh", "refresh only"):
        assert 0 < results[name][1] < full_bytes
        assert results[name][2].fetched_per_token() > 0
    assert results["lsa"][2].tokens_generated == results["lsa+refresh"][2].tokens_generated > 0


SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "compare_methods.py"


def _entry(accuracy: float, kib: int) -> dict:
    return {"accuracy": {"single_needle": accuracy}, "csa_device_bytes": kib * 1024}


def test_the_script_joins_runs_of_separate_lengths_into_one_table_and_plot(tmp_path):
    for length, accuracy in ((2048, 0.5), (512, 1.0)):
        part = {str(length): {"full": _entry(accuracy, 8), "lsa": _entry(accuracy / 2, 1)}}
        (tmp_path / f"{length}.json").write_text(json.dumps(part))
    out, plot = tmp_path / "all.json", tmp_path / "all.png"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--merge", str(tmp_path / "2048.json"), str(tmp_path / "512.json"),
         "--out", str(out), "--plot", str(plot)],
        capture_output=True, text=True, timeout=120, check=True,
    )
    assert list(json.loads(out.read_text())) == ["512", "2048"]
    assert plot.stat().st_size > 0
    assert "   512 | lsa          |      50.0 |            1.0 |    0.12 |       - |" in done.stdout


def test_the_script_refuses_to_join_two_runs_of_the_same_length(tmp_path):
    part = tmp_path / "512.json"
    part.write_text(json.dumps({"512": {"full": _entry(1.0, 8)}}))
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--merge", str(part), str(part), "--out", str(tmp_path / "o.json")],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode != 0 and "appears in more than one" in done.stderr
    assert not (tmp_path / "o.json").exists()


def test_the_script_pools_draws_of_the_same_lengths_into_their_mean(tmp_path):
    draws = []
    for seed, (accuracy, kib) in enumerate(((1.0, 2), (0.5, 4))):
        draw = {"512": {"full": _entry(1.0, 8), "lsa": {**_entry(accuracy, kib), "fetched_per_token": 2.0 * seed}}}
        draws.append(tmp_path / f"s{seed}.json")
        draws[-1].write_text(json.dumps(draw))
    out = tmp_path / "pooled.json"
    subprocess.run(
        [sys.executable, str(SCRIPT), "--pool", *map(str, draws), "--out", str(out), "--plot", str(tmp_path / "p.png")],
        capture_output=True, text=True, timeout=120, check=True,
    )
    lsa = json.loads(out.read_text())["512"]["lsa"]
    assert lsa == {"accuracy": {"single_needle": 0.75}, "csa_device_bytes": 3 * 1024, "fetched_per_token": 1.0}


def test_the_script_refuses_to_pool_draws_of_other_methods(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"512": {"full": _entry(1.0, 8), "lsa": _entry(0.5, 1)}}))
    (tmp_path / "b.json").write_text(json.dumps({"512": {"full": _entry(1.0, 8)}}))
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--pool", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
         "--out", str(tmp_path / "o.json")],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode != 0 and "cannot pool them" in done.stderr
    assert not (tmp_path / "o.json").exists()


def test_the_script_refuses_to_pool_a_draw_without_a_measure_the_others_have(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"512": {"full": {**_entry(1.0, 8), "fetched_per_token": 0.0}}}))
    (tmp_path / "b.json").write_text(json.dumps({"512": {"full": _entry(1.0, 8)}}))
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--pool", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
         "--out", str(tmp_path / "o.json")],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode != 0 and "cannot pool them" in done.stderr and "Traceback" not in done.stderr
