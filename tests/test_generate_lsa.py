"""The README's main job: a question asked of a saved paper-layout backbone and its indexer (--backbone,
--indexer; an untrained smoke-size pair: what holds for any weights), the shipped pair it asks by default, and
the tiny random model of --tiny."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fm_transformers as fm
from fm_transformers.eval import build_eval_backbone, eval_backbone_config

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "generate_lsa.py"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper-smoke")
    torch.manual_seed(0)
    model = build_eval_backbone(eval_backbone_config("paper-smoke"), seed=0)
    model.save_pretrained(root / "backbone")
    fm.MemoryIndexerModel.from_backbone(model, num_heads=2, rank=8).save_pretrained(root / "indexer")
    return root


def ask(saved, *flags):
    command = [sys.executable, str(SCRIPT), "--backbone", str(saved / "backbone"), "--indexer", str(saved / "indexer")]
    return subprocess.run(command + list(flags), capture_output=True, text=True, timeout=300)


def test_lsa_keeping_every_chunk_answers_as_the_full_cache_and_both_caches_are_reported(saved):
    flags = ["--task", "qa_block", "--context", "256", "--answer-tokens", "15", "--tau", "4", "--threshold", "0"]
    result = ask(saved, *flags)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "qa_block: a 256-token context, an answer of 15 tokens (token ids)"
    assert "writes the full cache's answer token for token: True" in result.stdout
    assert "stock cache (full)" in result.stdout and "LSA memory report" in result.stdout
    recalls = next(line for line in lines if "recalls per layer" in line)
    assert recalls.split("recalls per layer: ")[1].startswith("4 ")  # 1 + (15 - 1) // 4 triggers


def test_a_backbone_without_its_indexer_is_a_clear_error(saved):
    command = [sys.executable, str(SCRIPT), "--backbone", str(saved / "backbone")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--backbone and --indexer go together" in result.stderr


def test_tiny_demo_keeping_everything_equals_stock():
    result = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--new-tokens", "8"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "LSA with threshold 0 equals stock token for token: True" in result.stdout


def test_tiny_with_a_backbone_is_a_clear_error(saved):
    result = ask(saved, "--tiny")
    assert result.returncode == 2 and "--tiny makes its own model" in result.stderr


def recalls_and_answer(stdout: str) -> tuple[int, int]:
    lines = stdout.splitlines()
    answer_tokens = int(lines[0].split("an answer of ")[1].split()[0])  # the task's answer, at most what was asked
    recalls = next(line for line in lines if "recalls per layer" in line)
    return int(recalls.split("recalls per layer: ")[1].split()[0]), answer_tokens


def test_by_default_the_shipped_pair_answers_at_its_indexers_tau_and_keeping_everything_equals_full():
    """No --backbone: the pair in checkpoints/ (the tau-16 indexer) loads together, recalls fire every 16 steps
    (no --tau: the indexer's own), and LSA keeping every chunk writes the full cache's tokens on a short question
    (what holds for any weights, checked on the shipped ones)."""
    flags = ["--task", "long_chain", "--context", "256", "--answer-tokens", "33", "--threshold", "0"]
    result = subprocess.run([sys.executable, str(SCRIPT), *flags], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "long_chain: a 256-token context, an answer of 30 tokens (token ids)"
    assert "writes the full cache's answer token for token: True" in result.stdout
    recalls, answer_tokens = recalls_and_answer(result.stdout)
    assert answer_tokens > 16 and recalls == 1 + (answer_tokens - 1) // 16


def test_the_shipped_tau64_indexer_goes_with_the_shipped_backbone_at_its_own_tau():
    """checkpoints/indexer-tau64 is a second indexer for the same backbone: it loads beside it, its recalls fire
    every 64 steps, and keeping every chunk writes the full cache's tokens."""
    shipped = SCRIPT.parents[1] / "checkpoints"
    flags = ["--backbone", str(shipped / "backbone-bf16"), "--indexer", str(shipped / "indexer-tau64"),
             "--task", "long_chain", "--context", "256", "--answer-tokens", "33", "--threshold", "0"]
    result = subprocess.run([sys.executable, str(SCRIPT), *flags], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "writes the full cache's answer token for token: True" in result.stdout
    recalls, answer_tokens = recalls_and_answer(result.stdout)
    assert 16 < answer_tokens <= 64 and recalls == 1
