"""A trained indexer survives save_pretrained / from_pretrained and fits the backbone that made its labels."""

import pytest
import torch

from fm_transformers.hub import attach_memory_indexer
from fm_transformers.indexer import MemoryIndexerModel, attached_memory_indexer
from fm_transformers.tiny import tiny_deepseek_v4
from fm_transformers.training.shards import LabelShards


def test_a_reloaded_indexer_scores_exactly_as_the_trained_one(trained, heldout_labels, tmp_path):
    output_dir, _ = trained
    model = MemoryIndexerModel.from_pretrained(output_dir)
    model.save_pretrained(tmp_path / "copy")
    copy = MemoryIndexerModel.from_pretrained(tmp_path / "copy")
    data = LabelShards(heldout_labels).load(0)
    hidden, positions = data["hidden/6"].unsqueeze(0), data["positions"].unsqueeze(0)
    keys = data["keys/6"].unsqueeze(0)
    assert torch.equal(model.scores(6, hidden, positions, keys), copy.scores(6, hidden, positions, keys))


def test_the_trained_indexer_fits_its_backbone_and_names_it(trained, backbone):
    output_dir, _ = trained
    model = MemoryIndexerModel.from_pretrained(output_dir)
    model.config.check_compatible(backbone.config)
    assert model.config.base_model_name_or_path == "tiny-seed-0"


def test_the_trained_indexer_attaches_to_its_backbone(trained):
    output_dir, _ = trained
    model = tiny_deepseek_v4(seed=0)
    indexer = attach_memory_indexer(model, str(output_dir))
    assert attached_memory_indexer(model) is indexer
    assert sorted(int(layer) for layer in indexer.config.layers) == [4, 6, 7]


def test_the_trained_indexer_refuses_a_backbone_of_other_dimensions(trained):
    output_dir, _ = trained
    with pytest.raises(ValueError, match="hidden_size"):
        attach_memory_indexer(tiny_deepseek_v4(seed=0, hidden_size=32), str(output_dir))
