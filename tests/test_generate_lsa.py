"""The README's main job: a question asked of a saved paper-layout backbone and its indexer (--backbone,
--indexer; an untrained smoke-size pair: what holds for any weights), the shipped pair it asks by default, and
the tiny random model of --tiny."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import fm_transformers as fm
from fm_transformers.eval import build_eval_backbone, eval_backbone_config
from fm_transformers.eval.catalog import evaluation_examples
from fm_transformers.eval.vocab import EOS, PAD

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


def test_the_shipped_backbone_and_indexer_load_together_and_keeping_everything_equals_full():
    """The default pair in checkpoints/: the indexer attaches to the backbone, and LSA keeping every chunk writes
    the full cache's tokens on a short question (what holds for any weights, checked on the shipped ones)."""
    spec = importlib.util.spec_from_file_location("generate_lsa", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = script.parse_args([])
    assert (args.backbone, args.indexer) == (str(script.SHIPPED_BACKBONE), str(script.SHIPPED_INDEXER))
    model = AutoModelForCausalLM.from_pretrained(args.backbone, dtype=torch.float32).eval()
    fm.attach_memory_indexer(model, args.indexer)
    example = evaluation_examples("qa_block", 256, 1, seed=1, answer_tokens=12)[0]
    input_ids = torch.tensor([example.input_ids])
    settings = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=PAD, eos_token_id=EOS)
    with torch.no_grad():
        full = model.generate(input_ids, **settings)
        keep_all = model.generate(input_ids, **settings, cache_implementation="lsa",
                                  cache_config={"tau": 4, "threshold": 0.0})
    assert torch.equal(full, keep_all)
