"""Memory indexers save, load (local dir) and attach like any transformers model."""

import torch
from transformers import AutoModel

import fm_transformers as fm
from tests.conftest import DEVICE


def test_save_load_attach_round_trip_gives_identical_scores(model, tmp_path):
    indexer = fm.MemoryIndexerModel.from_backbone(model, layers=[4, 6], num_heads=4, rank=8, base_model_name_or_path="tiny")
    indexer.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, fm.MemoryIndexerModel) and loaded.config.layers == [4, 6]
    hidden, positions, keys = (t.to(DEVICE) for t in (torch.randn(2, 3, 64), torch.tensor([[30, 31, 32]] * 2), torch.randn(2, 8, 16)))
    indexer.to(DEVICE)  # attach places the loaded one on the model's device
    try:
        attached = fm.attach_memory_indexer(model, str(tmp_path))
        assert fm.attached_memory_indexer(model) is attached
        for layer in (4, 6):
            assert torch.equal(attached.scores(layer, hidden, positions, keys), indexer.scores(layer, hidden, positions, keys))
    finally:
        fm.detach_memory_indexer(model)


def test_auto_lsa_model_loads_backbone_named_in_indexer_config(model, tmp_path):
    model.save_pretrained(tmp_path / "backbone")
    indexer = fm.MemoryIndexerModel.from_backbone(model, layers=[2], num_heads=4, rank=8, base_model_name_or_path=str(tmp_path / "backbone"))
    indexer.save_pretrained(tmp_path / "indexer")
    loaded = fm.AutoLSAModelForCausalLM.from_pretrained(str(tmp_path / "indexer"))
    assert fm.attached_memory_indexer(loaded).config.layers == [2]
    prompt = torch.randint(4, 90, (1, 30))
    lsa = loaded.generate(prompt, max_new_tokens=5, do_sample=False, cache_implementation="lsa", cache_config={"threshold": 0.0})
    assert torch.equal(lsa, model.generate(prompt, max_new_tokens=5, do_sample=False))


def test_attach_finds_a_home_relative_directory(model, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    fm.MemoryIndexerModel.from_backbone(model, layers=[2], num_heads=4, rank=8).save_pretrained(tmp_path / "indexer")
    try:
        assert fm.attach_memory_indexer(model, "~/indexer").config.layers == [2]
    finally:
        fm.detach_memory_indexer(model)
