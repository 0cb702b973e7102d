"""examples/train_eval_indexer.py --vote: the dump's labels use the vote asked for, and a vote the backbone cannot
give is a clear error before any work."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fm_transformers.eval import build_eval_backbone, eval_backbone_config

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "train_eval_indexer.py"
SMALL = ["--device", "cpu", "--length", "320", "--spacing", "128", "--align", "8", "--dump-tau", "4",
         "--train-docs", "1", "--validation-docs", "1", "--test-docs", "1", "--block-size", "1"]


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    path = tmp_path_factory.mktemp("paper-smoke") / "backbone"
    build_eval_backbone(eval_backbone_config("paper-smoke"), seed=0).save_pretrained(path)
    return path


def dump(backbone, workdir, *flags):
    command = [sys.executable, str(SCRIPT), "--backbone", str(backbone), "--workdir", str(workdir), "--stage", "dump"]
    return subprocess.run(command + SMALL + list(flags), capture_output=True, text=True, timeout=300)


def test_the_dump_labels_with_the_vote_asked_for_and_the_scaled_one_by_default(backbone, tmp_path):
    for flags, vote in (([], 1), (["--vote", "2"], 2)):  # paper-smoke has 7 CSA layers: 3 of 21 scaled is 1
        workdir = tmp_path / f"vote{vote}"
        done = dump(backbone, workdir, *flags)
        assert done.returncode == 0, done.stderr[-2000:]
        manifest = json.loads((workdir / "raw" / "train" / "block-0000" / "manifest.json").read_text())
        assert manifest["labels"]["vote"] == vote and manifest["complete"]


@pytest.mark.parametrize("vote, message", [("0", "--vote must be at least 1"), ("8", "--vote 8 asks more CSA layers")])
def test_a_vote_the_backbone_cannot_give_is_a_clear_error(backbone, tmp_path, vote, message):
    refused = dump(backbone, tmp_path / "refused", "--vote", vote)
    assert refused.returncode in (1, 2) and message in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "refused" / "raw").exists()
