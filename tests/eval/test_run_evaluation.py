"""The GPU recipe (examples/run_evaluation.sh) end to end at CPU sizes: every stage, its outputs, and a rerun
that finds everything done."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(*args, work):
    env = {**os.environ, "SMOKE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        ["bash", "examples/run_evaluation.sh", *args, str(work)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )


def run_to_the_end(*args, work, calls=5):
    """A resumable stage again while it stops at its time limit (status 75), as its user does."""
    for _ in range(calls):
        done = run(*args, work=work)
        if done.returncode != 75:
            return done
    return done


@pytest.fixture(scope="module")
def smoke_recipe(tmp_path_factory):
    """The smoke recipe's working directory after `all`."""
    work = tmp_path_factory.mktemp("smoke")
    done = run("all", work=work)
    assert done.returncode == 0, done.stderr[-3000:]
    return work


def test_the_smoke_recipe_runs_every_stage_and_a_rerun_skips_what_is_done(smoke_recipe):
    tmp_path = smoke_recipe
    assert (tmp_path / "backbone-bf16" / "config.json").is_file()
    # six backbone stages, each from the weights of the one before: recall, copy, long, more of long, more at a
    # wider window, which the exports carry on to the stages after it, then under LSA's restriction
    stages = (("recall", None), ("copy", "recall-bf16"), ("long", "copy-bf16"), ("long2", "long-bf16"),
              ("window", "long2-bf16"), ("backbone", "window-bf16"))
    configs = {stage: json.loads((tmp_path / stage / "eval.json").read_text())["config"] for stage, _ in stages}
    for stage, started_from in stages:
        assert configs[stage]["init_from"] == (started_from and str(tmp_path / started_from))
    assert [configs[stage]["restricted_share"] for stage, _ in stages] == [0.0] * 5 + [0.75]
    windows = {name: json.loads((tmp_path / f"{name}-bf16" / "config.json").read_text())["sliding_window"]
               for name in ("long2", "window", "backbone")}
    assert windows["backbone"] == windows["window"] == 2 * windows["long2"]
    probe = json.loads((tmp_path / "probe.json").read_text())["results"]
    assert all(rows["oracle budget None"]["same_as_stock"] == 1.0 for rows in probe.values())
    gate = json.loads((tmp_path / "indexer" / "tau4" / "gate.json").read_text())
    assert gate["chosen_on"] == "validation" and "all" in gate["test"]
    assert sorted(gate["labels_on_test"]) == ["evidence", "evidence-window", "vote1", "vote2"]
    # every label set from fresh weights and from the native indexer's query towers, all chosen among
    assert sorted(gate["validation"]) == sorted(
        f"{labels}-lr0.003{start}" for labels in gate["labels_on_test"] for start in ("", "-native")
    )
    assert json.loads((tmp_path / "tuned4.json").read_text())["seed"] == 0
    result = json.loads((tmp_path / "tau4.json").read_text())
    assert result["seed"] == 1 and result["tuning"]["seed"] == 0
    assert list(result["summary"]["320"]) == [
        "full", "lsa", "recency (matched)", "random (matched)", "lsa (budget)", "oracle lookahead", "native paging",
        "lsa + native paging",
    ]
    # the native-paging rows run as a part of their own, read against full's same example
    paging_part = json.loads((tmp_path / "compare" / "tau4-320-long-paging-0.json").read_text())["records"]["320"]
    assert sorted(paging_part) == ["lsa + native paging", "native paging"]
    assert result["summary"]["320"]["native paging"]["examples"] == result["summary"]["320"]["full"]["examples"] == 3
    again = run("compare", work=tmp_path)
    assert again.returncode == 0 and "compare" not in again.stderr


def test_a_fresh_machine_given_only_the_newest_export_trains_only_the_stages_after_it(tmp_path):
    """What a device call on a fresh machine sees when a session carries one stage's bf16 export."""
    given = tmp_path / "given"
    assert run_to_the_end("backbone", work=given).returncode == 0
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.copytree(given / "window-bf16", fresh / "window-bf16")
    done = run_to_the_end("backbone", work=fresh)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(path.name for path in fresh.iterdir()) == ["backbone", "backbone-bf16", "window-bf16"]
    config = json.loads((fresh / "backbone" / "eval.json").read_text())["config"]
    assert config["init_from"] == str(fresh / "window-bf16") and config["lr"] == 5e-4 and config["mix"] == "long"
    assert config["sliding_window"] == 16 and config["restricted_share"] == 0.75
    # a call cut short while the last stage evaluated (its export written first, its eval.json not yet):
    # the next run resumes at the last step and evaluates, without training again
    (fresh / "backbone" / "eval.json").unlink()
    again = run("backbone", work=fresh)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stderr and "at step 2 of 2" in again.stderr
    assert json.loads((fresh / "backbone" / "eval.json").read_text())["config"]["init_from"] == str(fresh / "window-bf16")


def test_the_key_probe_gates_every_key_kind_on_the_recipes_dump_and_refuses_other_documents(smoke_recipe, tmp_path):
    probe = [sys.executable, "examples/probe_indexer_keys.py", "--backbone", str(smoke_recipe / "backbone-bf16"),
             "--labels", str(smoke_recipe / "indexer" / "tau4" / "evidence-window"), "--length", "320",
             "--align", "8", "--steps", "3", "--documents-per-step", "2", "--heads", "2", "--rank", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out, cache = tmp_path / "probe.json", ["--cache-dir", str(tmp_path / "cache")]
    done = subprocess.run([*probe, "--spacing", "128", *cache, "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    gate, config = result["gate"], json.loads((smoke_recipe / "backbone-bf16" / "config.json").read_text())
    assert set(gate) == {f"{kind}/{split}" for kind in ("index", "main", "main-projected") for split in ("train", "validation")}
    width = config["index_head_dim"]
    assert result["key_dims"] == {"index": width, "main": config["head_dim"], "main-projected": width}
    assert all(0.0 <= metrics["all"]["budget_window_evidence_recall"] <= 1.0 for metrics in gate.values())
    # a second run reads the main KV kept in the cache (no forward) and, seeded alike, gates alike
    again = subprocess.run([*probe, "--spacing", "128", *cache, "--keys", "main", "--out", str(tmp_path / "again.json")],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "main KV" not in again.stderr
    assert json.loads((tmp_path / "again.json").read_text())["gate"]["main/validation"] == gate["main/validation"]
    # documents drawn with another spacing are not the dump's: the recomputed index keys differ
    wrong = subprocess.run([*probe, "--spacing", "64", "--out", str(tmp_path / "x.json")], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
    assert wrong.returncode != 0 and "does not match the dump's" in wrong.stderr
    assert not (tmp_path / "x.json").exists()
