"""Backbone-free training: what it learns, what it touches, and that its options and resumption work."""

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from training_helpers import TARGET_LAYERS, small_train_config
from transformers import AutoModelForCausalLM, DeepseekV4ForCausalLM
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4Model

from fm_transformers.indexer import MemoryIndexerModel
from fm_transformers.training.dataset import DocumentBlockSampler, TriggerDataset, collate_triggers
from fm_transformers.training.losses import indexer_loss
from fm_transformers.training.shards import LabelShards
from fm_transformers.training.trainer import train


def test_trained_indexer_beats_recency_of_the_same_size_on_used_chunks(trained):
    _, summary = trained
    metrics = summary["metrics"]
    recency = metrics["recency"]
    print("indexer", {k: round(v, 3) for k, v in metrics.items() if isinstance(v, float)})
    print("recency", {k: round(v, 3) for k, v in recency.items()})
    assert 0.05 < metrics["resident_fraction"] < 0.8
    assert recency["resident_fraction"] == pytest.approx(metrics["resident_fraction"])
    assert metrics["used_recall"] > recency["used_recall"] + 0.05
    assert metrics["f1"] > recency["f1"]


def test_training_never_builds_or_loads_a_backbone(train_labels, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the trainer touched the backbone")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(DeepseekV4ForCausalLM, "__init__", refuse)
    monkeypatch.setattr(DeepseekV4Model, "__init__", refuse)
    summary = train(small_train_config(train_labels, tmp_path / "out", max_steps=3))
    assert summary["steps"] == 3


def test_only_memory_indexer_weights_are_saved(trained):
    output_dir, _ = trained
    model = MemoryIndexerModel.from_pretrained(output_dir)
    names = {name for name, _ in model.named_parameters()}
    assert names and all(name.startswith("indexers.") for name in names)
    assert sorted(int(layer) for layer in model.config.layers) == list(TARGET_LAYERS)


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(train_labels, tmp_path):
    config = small_train_config(train_labels, tmp_path / "straight", max_steps=12, save_every=6)
    train(config)
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-00000012")
    (tmp_path / "resumed" / "model.safetensors").unlink()
    resumed = small_train_config(train_labels, tmp_path / "resumed", max_steps=12, save_every=6, resume=True)
    assert train(resumed)["steps"] == 12
    first = MemoryIndexerModel.from_pretrained(tmp_path / "straight").state_dict()
    second = MemoryIndexerModel.from_pretrained(tmp_path / "resumed").state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_an_output_with_checkpoints_needs_resume(train_labels, trained):
    output_dir, _ = trained
    with pytest.raises(FileExistsError, match="--resume"):
        train(small_train_config(train_labels, output_dir, max_steps=1))


def test_plain_bce_trains(train_labels, tmp_path):
    summary = train(small_train_config(train_labels, tmp_path / "out", max_steps=4, loss="bce"))
    assert summary["hyperparameters"]["loss"] == "bce" and math.isfinite(summary["final_loss"])


def test_bf16_mixed_precision_trains(train_labels, tmp_path):
    # accelerate fixes the precision once per process, so this run gets its own, as with the real command
    command = [sys.executable, "-m", "fm_transformers.training.cli", "train", "--data", str(train_labels)]
    command += ["--output", str(tmp_path / "out"), "--num-heads", "8", "--rank", "64", "--max-steps", "4"]
    command += ["--batch-size", "16", "--bf16", "--cpu"]
    subprocess.run(command, check=True, capture_output=True)
    summary = json.loads((tmp_path / "out" / "training_summary.json").read_text())
    assert summary["hyperparameters"]["bf16"] is True and math.isfinite(summary["final_loss"])


def test_lora_adapts_an_existing_indexer_and_saves_a_plain_one(train_labels, trained, tmp_path):
    pytest.importorskip("peft")
    base_dir, _ = trained
    summary = train(small_train_config(train_labels, tmp_path / "lora", max_steps=5, init_from=str(base_dir), lora_r=4))
    assert summary["hyperparameters"]["lora_r"] == 4
    base = MemoryIndexerModel.from_pretrained(base_dir).state_dict()
    adapted = MemoryIndexerModel.from_pretrained(tmp_path / "lora").state_dict()
    assert base.keys() == adapted.keys()
    changed = [name for name in base if not torch.equal(base[name], adapted[name])]
    assert changed and all("proj" in name for name in changed)


def test_lora_needs_an_indexer_to_adapt(train_labels, tmp_path):
    with pytest.raises(ValueError, match="--init-from"):
        small_train_config(train_labels, tmp_path, lora_r=4)


def test_focal_loss_with_gamma_zero_is_plain_bce_and_discounts_easy_chunks():
    logits = torch.tensor([[4.0, -4.0, 0.5]])
    targets = torch.tensor([[1.0, 0.0, 0.0]])
    mask = torch.ones(1, 3)
    assert indexer_loss(logits, targets, mask, "focal", gamma=0.0) == pytest.approx(
        indexer_loss(logits, targets, mask, "bce").item()
    )
    assert indexer_loss(logits, targets, mask, "focal", gamma=2.0) < indexer_loss(logits, targets, mask, "bce")


def test_padding_does_not_count_in_the_loss():
    logits, targets = torch.tensor([[1.0, 9.0]]), torch.tensor([[1.0, 0.0]])
    assert indexer_loss(logits, targets, torch.tensor([[1.0, 0.0]]), "bce") == pytest.approx(
        indexer_loss(logits[:, :1], targets[:, :1], torch.ones(1, 1), "bce").item()
    )


def test_samples_hold_positives_and_three_times_as_many_visible_negatives(train_labels):
    dataset = TriggerDataset(LabelShards(train_labels), list(TARGET_LAYERS), negative_ratio=3.0, seed=0)
    for index in range(0, len(dataset), 7):
        sample = dataset[index]
        positives = sample["candidates"][sample["targets"] == 1]
        negatives = sample["candidates"][sample["targets"] == 0]
        visible = (int(sample["position"]) + 1) // 4
        assert negatives.numel() == min(3 * max(1, positives.numel()), visible - positives.numel())
        assert not set(negatives.tolist()) & set(positives.tolist())
        assert int(sample["candidates"].max()) < visible


def test_sampling_is_a_function_of_the_seed(train_labels):
    shards = LabelShards(train_labels)
    first, second, other = (TriggerDataset(shards, [4], seed=seed) for seed in (0, 0, 1))
    assert torch.equal(first[5]["candidates"], second[5]["candidates"])
    assert list(DocumentBlockSampler(first, seed=0)) == list(DocumentBlockSampler(second, seed=0))
    assert list(DocumentBlockSampler(first, seed=0)) != list(DocumentBlockSampler(other, seed=1))


def test_batches_pad_candidates_and_mask_the_padding(train_labels):
    dataset = TriggerDataset(LabelShards(train_labels), [4, 6])
    samples = [dataset[0], dataset[10]]
    batch = collate_triggers(samples)
    width = max(sample["candidates"].numel() for sample in samples)
    assert batch["keys"][4].shape == (2, width, 16) and batch["hidden"][6].shape == (2, 64)
    assert batch["mask"].sum(-1).tolist() == [float(sample["candidates"].numel()) for sample in samples]
