"""The backbone example scripts (train_eval_backbone, copy_learning_check, score_backbone_tasks): they run, and bad
input gets one clear line, no traceback, nothing trained."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "train_eval_backbone.py"
SMOKE = [
    "--device",
    "cpu",
    "--size",
    "smoke",
    "--steps",
    "1",
    "--dense-steps",
    "0",
    "--min-length",
    "96",
    "--max-length",
    "96",
    "--tokens-per-step",
    "192",
    "--eval-lengths",
    "96",
    "--eval-examples",
    "1",
]


def run_script(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *SMOKE, *flags],
        capture_output=True,
        text=True,
        timeout=300,
        env={"OMP_NUM_THREADS": "1", "PATH": ""},
    )


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--init-from", "{tmp}/missing"], "is not a saved backbone (no config.json in it)"),
        (["--extra-tasks", "variable_tracking,no_such_task"], "extra_tasks must be evaluation tasks"),
        (["--dense-steps", "5"], "0 <= dense_steps <= steps"),
    ],
)
def test_bad_flags_end_with_one_error_line_and_train_nothing(tmp_path, flags, message):
    flags = [flag.replace("{tmp}", str(tmp_path)) for flag in flags]
    done = run_script("--output-dir", str(tmp_path / "out"), *flags)
    assert done.returncode != 0
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


def test_a_run_stopped_by_max_minutes_exits_75_and_the_same_command_finishes_it(tmp_path):
    flags = ["--output-dir", str(tmp_path / "out"), "--steps", "2", "--resume"]
    stopped = run_script(*flags, "--max-minutes", "0")
    assert stopped.returncode == 75 and "run again to go on" in stopped.stdout
    assert (tmp_path / "out" / "checkpoint.pt").exists() and not (tmp_path / "out" / "model").exists()
    finished = run_script(*flags)
    assert finished.returncode == 0, finished.stderr
    assert (tmp_path / "out" / "model").is_dir() and (tmp_path / "out" / "eval.json").is_file()


def test_time_steps_times_each_phase_projects_the_run_and_writes_nothing(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *SMOKE, "--steps", "4", "--dense-steps", "1", "--time-steps", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        env={"OMP_NUM_THREADS": "1", "PATH": ""},
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "a step of 192 tokens at 96: dense " in done.stdout and ", sparse " in done.stdout
    assert "4 steps: at most" in done.stdout
    assert list(tmp_path.iterdir()) == []


def test_time_steps_projection_adds_each_phase_at_its_own_step_time():
    from fm_transformers.eval.backbone_training import TrainingConfig, time_steps

    config = TrainingConfig(size="smoke", steps=5, dense_steps=2, min_length=64, max_length=96, ramp_steps=2,
                            tokens_per_step=192, precision="fp32")
    timing = time_steps(config, "cpu", steps=1)
    assert timing["context"] == 96 and timing["dense_s"] > 0 and timing["sparse_s"] > 0
    expected = (2 * timing["dense_s"] + 3 * timing["sparse_s"]) / 60
    assert timing["projected_minutes"] == pytest.approx(expected)
    sparse_only = time_steps(TrainingConfig(**{**config.__dict__, "dense_steps": 0}), "cpu", steps=1)
    assert sparse_only["dense_s"] is None and sparse_only["sparse_s"] > 0


def test_the_copy_learning_check_trains_and_reports_and_refuses_bad_contexts_vocabularies_and_starting_weights():
    check = Path(__file__).resolve().parents[2] / "examples" / "copy_learning_check.py"
    command = [sys.executable, str(check), "--size", "smoke", "--device", "cpu", "--tokens-per-step", "128"]
    done = subprocess.run([*command, "--steps", "2", "--report-every", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [line.split()[:2] for line in done.stdout.splitlines() if line.startswith("step")] == [
        ["step", "1"], ["step", "2"]
    ]
    refused = subprocess.run([*command, "--context", "0"], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "must be at least 1" in refused.stderr and "Traceback" not in refused.stderr
    too_small = subprocess.run([*command, "--vocabulary", "long"], capture_output=True, text=True, timeout=300)
    assert too_small.returncode == 1 and "long vocabulary needs ids up to 2047" in too_small.stderr
    assert "Traceback" not in too_small.stderr
    assert "smoke, untied embeddings" in done.stdout  # the smoke size's own
    tied = subprocess.run(
        [*command, "--steps", "1", "--embeddings", "tied"], capture_output=True, text=True, timeout=300
    )
    assert tied.returncode == 0 and "smoke, tied embeddings" in tied.stdout, tied.stderr[-2000:]
    both = subprocess.run(
        [*command, "--embeddings", "untied", "--init-from", "x"], capture_output=True, text=True, timeout=300
    )
    assert both.returncode == 1 and "cannot start from --init-from" in both.stderr
    not_saved = subprocess.run([*command, "--init-from", "/nonexistent"], capture_output=True, text=True, timeout=300)
    assert not_saved.returncode == 1 and "not a saved backbone" in not_saved.stderr
    assert "Traceback" not in not_saved.stderr


def test_the_task_scorer_scores_every_task_and_renaming_and_refuses_a_short_vocabulary(tmp_path):
    from fm_transformers.eval.backbone import build_eval_backbone, eval_backbone_config

    build_eval_backbone(eval_backbone_config("paper-smoke"), seed=0).save_pretrained(tmp_path / "paper")
    build_eval_backbone(eval_backbone_config("smoke"), seed=0).save_pretrained(tmp_path / "short")
    scorer = Path(__file__).resolve().parents[2] / "examples" / "score_backbone_tasks.py"
    command = [sys.executable, str(scorer), "--lengths", "64", "--rows", "1", "--device", "cpu"]
    done = subprocess.run([*command, str(tmp_path / "paper")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    scored = [line.split() for line in done.stdout.splitlines() if line.strip().startswith("64 ")]
    assert len(scored) == 11 + 2 * 4 + 3
    assert {"long_needle", "qa_block", "long_chain", "qa_document"} <= {fields[1] for fields in scored}
    assert all(0.0 <= float(fields[-1].rstrip("%")) <= 100.0 for fields in scored if "lookup-near" not in fields)
    norms = [line for line in done.stdout.splitlines() if re.search(r" output +[\d.]+ \(fresh", line)]
    assert [line.split(" output")[0].strip() for line in norms] == [
        "short keys", "short values", "filler", "long keys", "long values"
    ]
    # the scored model is a fresh one of the same config and seed: its norms are the fresh ones
    assert all(
        float(line.split("output")[1].split()[0]) == float(line.split("(fresh")[1].split(")")[0]) for line in norms
    )
    # lookups are an item's first token: one per long_needle answer, one of five tokens in the others
    split = {fields[1]: [int(fields[i]) for i in (5, 9, 13)] for fields in scored if "lookup-near" in fields}
    assert sorted(split) == ["long_chain", "long_needle", "qa_block"]
    lookups = {task: (near + far, copy) for task, (near, far, copy) in split.items()}
    assert lookups["long_needle"][0] == 1 and all(copy == 4 * lookup > 0 for lookup, copy in
                                                  (lookups["qa_block"], lookups["long_chain"]))
    refused = subprocess.run([*command, str(tmp_path / "short")], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and "these tasks need 2048" in refused.stderr and "Traceback" not in refused.stderr


def test_the_task_scorer_answers_the_long_tasks_greedily_and_refuses_a_context_too_short_for_them(tmp_path):
    from fm_transformers.eval.backbone import build_eval_backbone, eval_backbone_config

    build_eval_backbone(eval_backbone_config("paper-smoke"), seed=0).save_pretrained(tmp_path / "paper")
    scorer = Path(__file__).resolve().parents[2] / "examples" / "score_backbone_tasks.py"
    command = [sys.executable, str(scorer), str(tmp_path / "paper"), "--rows", "1", "--device", "cpu", "--greedy", "2"]
    done = subprocess.run([*command, "--lengths", "640"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    greedy = done.stdout.split("greedy answers of the long tasks")[1].splitlines()[1:]
    assert [line.split()[:2] for line in greedy] == [["640", task] for task in ("long_needle", "qa_block", "long_chain")]
    for line in greedy:  # an untrained model: counts that add up to the examples, errors named and placed
        whole = int(line.split("whole ")[1].split(" of 2")[0])
        kinds = [int(count) for count in re.findall(r"(?:lookup|swap|copy) (\d+)", line)]
        assert whole + sum(kinds) == 2 and (whole == 2 or len(line.split("at tokens ")[1].split(",")) == 2 - whole)
    refused = subprocess.run([*command, "--lengths", "64"], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and "error: --greedy:" in refused.stderr and "answer loss" not in refused.stdout


def test_a_lookup_is_near_when_its_token_lies_inside_the_sliding_window(load_example):
    import torch

    from fm_transformers.eval.batches import IGNORE, Batch

    scorer = load_example("score_backbone_tasks.py")
    input_ids = torch.tensor([[5, 7, 9, 11, 13, 15, 17]])
    targets = torch.full_like(input_ids, IGNORE)
    targets[0, 4], targets[0, 5] = 7, 15  # 7 sits at position 1; 15 at position 5, the predicting position itself
    batch = Batch(input_ids, targets, torch.zeros(0, dtype=torch.long), 7)
    marked = targets != IGNORE
    assert scorer.source_in_window(batch, marked, 4)[0].tolist() == [False] * 4 + [True, True, False]
    assert scorer.source_in_window(batch, marked, 3)[0].tolist() == [False] * 5 + [True, False]
