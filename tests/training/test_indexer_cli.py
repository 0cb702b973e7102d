"""`fm-indexer`: every subcommand documents itself, and the training four run end to end on the tiny backbone offline
(convert: tests/test_official_indexer.py)."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from fm_indexer import main
from fm_transformers.indexer import PAPER_TARGET_CSA_ORDINALS, MemoryIndexerModel
from fm_transformers.training.push import default_template, render_card
from fm_transformers.training.synthetic import needle_documents, write_jsonl


@pytest.mark.parametrize(
    "command, option",
    [
        ("dump-labels", "--documents"),
        ("train", "--negative-ratio"),
        ("eval", "--threshold"),
        ("push", "--local-dir"),
        ("convert", "--official-checkpoint"),
    ],
)
def test_every_subcommand_has_help(command, option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert option in capsys.readouterr().out


@pytest.mark.parametrize(
    "command, shown",
    [
        ("train", ["--num-heads NUM_HEADS indexer heads per target layer (default: 128)", "(default: 1)",
                   "(default: 0.001)", "AdamW weight decay (default: 0.0)", "negative sampling (default: 0)"]),
        ("eval", ["reaches this (default: 0.5)", "(default: cpu)"]),
        ("dump-labels", ["in tokens (default: 64)", f"CSA ordinals {' '.join(map(str, PAPER_TARGET_CSA_ORDINALS))}: model layers 22 26 42"]),
        ("convert", ["(default: checkpoints/top3_R930_joint.pt)"]),
    ],
)
def test_help_shows_every_default(command, shown, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for line in shown:
        assert line in text


@pytest.mark.parametrize(
    "arguments, exit_code",
    [(["--help"], 0), (["eval", "--help"], 0), (["eval", "--indexer", "x", "--data", "y", "--treshold", "0.3"], 2)],
)
def test_help_and_usage_errors_answer_without_importing_torch(arguments, exit_code):
    """`python -m fm_indexer` runs what the `fm-indexer` script runs (fm_indexer:main, tests/test_packaging.py);
    -X importtime lists every module the interpreter imports."""
    command = [sys.executable, "-X", "importtime", "-m", "fm_indexer", *arguments]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == exit_code, result.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "fm_indexer" in imported
    assert not imported & {"torch", "transformers", "fm_transformers"}


def test_card_of_an_indexer_for_a_hub_backbone_loads_it_from_the_hub(backbone):
    indexer = MemoryIndexerModel.from_backbone(backbone, layers=[4], num_heads=4, rank=8, base_model_name_or_path="org/backbone")
    card = render_card(indexer, None, "someone/fm-indexer", default_template())
    assert "\nbase_model: org/backbone\n" in card
    assert 'model = AutoModelForCausalLM.from_pretrained("org/backbone", dtype="auto", device_map="auto")' in card


def test_dump_train_eval_push_from_the_command_line(tmp_path, capsys):
    documents = tmp_path / "docs.jsonl"
    records = needle_documents(3, 96, seed=0)
    records.append({"id": "text", "text": "The quick brown fox jumps over the lazy dog. " * 3})  # tiny_tokenizer
    write_jsonl(documents, records)
    dump = ["dump-labels", "--model", "tiny", "--documents", str(documents), "--layers", "4", "6"]
    assert main([*dump, "--output", str(tmp_path / "labels"), "--tau", "16", "--chunk-size", "48"]) == 0

    train = ["train", "--data", str(tmp_path / "labels"), "--eval-data", str(tmp_path / "labels")]
    train += ["--output", str(tmp_path / "indexer"), "--num-heads", "4", "--rank", "16", "--max-steps", "3"]
    assert main([*train, "--batch-size", "8", "--cpu"]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["steps"] == 3 and set(trained["metrics"]["recency"]) >= {"used_recall", "f1"}

    metrics_file = tmp_path / "metrics.json"
    evaluate = ["eval", "--indexer", str(tmp_path / "indexer"), "--data", str(tmp_path / "labels")]
    assert main([*evaluate, "--output", str(metrics_file)]) == 0
    assert json.loads(metrics_file.read_text())["documents"] == 4

    repo = tmp_path / "repo"
    push = ["push", "--indexer", str(tmp_path / "indexer"), "--repo-id", "someone/fm-indexer-tiny"]
    assert main([*push, "--local-dir", str(repo)]) == 0
    card = (repo / "README.md").read_text()
    assert "`fm_transformers.tiny(seed=0)`, which is not a Hub repo" in card and "\nbase_model:" not in card
    assert "| used_recall |" in card and "| documents | 4 |" in card and "$" not in card
    assert MemoryIndexerModel.from_pretrained(repo).config.layers == [4, 6]


def test_an_empty_jsonl_fails_the_command_and_writes_nothing(tmp_path, caplog):
    (tmp_path / "empty.jsonl").write_text("")
    command = ["dump-labels", "--model", "tiny", "--documents", str(tmp_path / "empty.jsonl")]
    assert main([*command, "--output", str(tmp_path / "labels"), "--layers", "4"]) == 2
    assert "holds no documents" in caplog.text
    assert not (tmp_path / "labels").exists()


def test_push_uploads_the_repo_folder_with_huggingface_hub(trained, monkeypatch):
    import huggingface_hub

    uploaded = {}

    class FakeApi:
        def __init__(self, token=None):
            uploaded["token"] = token

        def create_repo(self, repo_id, private=False, exist_ok=False):
            uploaded["repo"] = (repo_id, private)

        def upload_folder(self, folder_path, repo_id, commit_message):
            uploaded["files"] = sorted(path.name for path in Path(folder_path).iterdir())
            return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/1")

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    output_dir, _ = trained
    command = ["push", "--indexer", str(output_dir), "--repo-id", "someone/fm-indexer-tiny", "--private"]
    assert main([*command, "--token", "hf_test"]) == 0
    assert uploaded["repo"] == ("someone/fm-indexer-tiny", True) and uploaded["token"] == "hf_test"
    assert uploaded["files"] == ["README.md", "config.json", "model.safetensors", "training_summary.json"]


def test_train_compile_and_loader_flags_reach_the_trainer(monkeypatch, tmp_path):
    """`fm-indexer train --compile --loader device-inline` is what reaches the benchmarked speed: both must reach
    TrainConfig, and the command offers exactly the trainer's loaders."""
    import fm_indexer
    from fm_transformers.training import cli, trainer

    seen = {}

    def fake_train(config):
        seen["compile"], seen["loader"] = config.compile, config.loader
        return {"steps": 0, "metrics": {}}

    monkeypatch.setattr(cli, "train", fake_train)
    assert fm_indexer.LOADERS == trainer.LOADERS
    cases = (([], (False, "device")), (["--compile", "--loader", "device-inline"], (True, "device-inline")))
    for flags, expected in cases:
        assert main(["train", "--data", str(tmp_path), "--output", str(tmp_path / "out"), "--cpu", *flags]) == 0
        assert (seen["compile"], seen["loader"]) == expected
