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
