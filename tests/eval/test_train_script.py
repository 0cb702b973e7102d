"""examples/train_eval_backbone.py on bad input: one clear line, no traceback, nothing trained."""

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
