"""Shards of bounded size: long documents cut into parts, read back whole or one part at a time."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from training_helpers import SPLIT_SHARD_BYTES, as_documents, dump_config

from fm_transformers.training import dump as dump_module
from fm_transformers.training.dump import dump_labels
from fm_transformers.training.labels import visible_chunks
from fm_transformers.training.shard_writer import cut, split_document
from fm_transformers.training.shards import MANIFEST, LabelShards
from fm_transformers.training.synthetic import needle_documents


def stored_bytes(path) -> int:
    with safe_open(str(path), framework="pt") as shard:
        tensors = [shard.get_tensor(name) for name in shard.keys()]  # noqa: SIM118 (safe_open is not iterable)
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def test_documents_larger_than_the_budget_are_cut_into_files_within_it(split_train_labels, train_documents):
    shards = LabelShards(split_train_labels)
    files = sorted(split_train_labels.glob("*.safetensors"))
    assert len(files) > 2 * len(train_documents)
    assert all(len(document.parts) > 1 for document in shards.documents)
    assert max(stored_bytes(path) for path in files) <= SPLIT_SHARD_BYTES


def test_short_documents_are_packed_together_up_to_the_budget(backbone, tmp_path):
    documents = as_documents(needle_documents(5, 96, seed=0))  # about 10 KB each: two or three fit the budget
    dump_labels(backbone, documents, tmp_path / "labels", dump_config(shard_bytes=25_000, docs_per_shard=16), "tiny")
    shards = LabelShards(tmp_path / "labels")
    files = sorted((tmp_path / "labels").glob("*.safetensors"))
    assert 1 < len(files) < len(documents)
    assert all(len(document.parts) == 1 for document in shards.documents)
    assert max(stored_bytes(path) for path in files) <= 25_000


def test_a_cut_document_reads_back_as_the_whole_one(train_labels, split_train_labels):
    whole, split = LabelShards(train_labels), LabelShards(split_train_labels)
    for index in (0, 7, 15):
        first, second = whole.load(index), split.load(index)
        assert first.keys() == second.keys()
        assert all(torch.equal(first[name], second[name]) for name in first)


def test_a_part_holds_its_rows_and_every_key_its_triggers_can_see(train_labels, split_train_labels):
    whole, split = LabelShards(train_labels).load(3), LabelShards(split_train_labels)
    for part, ref in enumerate(split.documents[3].parts):
        first, end = ref.rows
        data = split.load_part(3, part)
        assert torch.equal(data["positions"], whole["positions"][first:end])
        assert torch.equal(data["hidden/4"], whole["hidden/4"][first:end])
        indptr = whole["labels/indptr"]
        assert torch.equal(data["labels/indices"], whole["labels/indices"][indptr[first] : indptr[end]])
        assert data["labels/indptr"][0] == 0
        assert data["keys/6"].shape[0] >= int(visible_chunks(data["positions"], 4).max())
        assert torch.equal(data["keys/6"], whole["keys/6"][: data["keys/6"].shape[0]])


def document_tensors() -> dict[str, torch.Tensor]:
    """A stored document of 15 trigger steps (one every 16 tokens from 16) over 64 chunks, one label each."""
    return {
        "positions": torch.arange(16, 256, 16),
        "hidden/4": torch.zeros(15, 8),
        "keys/4": torch.zeros(64, 4),
        "labels/indptr": torch.arange(16),
        "labels/indices": torch.zeros(15, dtype=torch.long),
        "used/indptr": torch.arange(16),
        "used/indices": torch.zeros(15, dtype=torch.long),
        "used/counts": torch.ones(15, dtype=torch.long),
    }


def test_parts_follow_each_other_and_stay_within_the_budget():
    tensors = document_tensors()
    parts = split_document(tensors, budget=400, compress_rate=4)
    rows, chunks = [rows for rows, _ in parts], [chunks for _, chunks in parts]
    assert len(parts) > 2
    assert rows[0][0] == 0 and rows[-1][1] == 15 and all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
    assert chunks[0][0] == 0 and chunks[-1][1] == 64 and all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    for part_rows, part_chunks in parts[:-1]:  # the last part also takes the chunks no trigger sees
        assert sum(t.numel() * t.element_size() for t in cut(tensors, part_rows, part_chunks).values()) <= 400


def test_a_trigger_step_larger_than_the_budget_is_a_part_of_its_own():
    parts = split_document(document_tensors(), budget=1, compress_rate=4)
    assert [rows for rows, _ in parts] == [(row, row + 1) for row in range(15)]


def test_an_interrupted_dump_of_cut_documents_resumes_to_the_same_files(backbone, tmp_path, monkeypatch):
    documents = as_documents(needle_documents(3, 160, seed=3))
    config = dump_config(shard_bytes=6_000)
    dump_labels(backbone, documents, tmp_path / "whole", config, "tiny")
    real, calls = dump_module.label_documents, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(dump_module, "label_documents", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        dump_labels(backbone, documents, tmp_path / "resumed", config, "tiny")
    assert len(LabelShards(tmp_path / "resumed").documents) == 2
    monkeypatch.setattr(dump_module, "label_documents", real)
    dump_labels(backbone, documents, tmp_path / "resumed", config, "tiny")
    whole = json.loads((tmp_path / "whole" / MANIFEST).read_text())
    resumed = json.loads((tmp_path / "resumed" / MANIFEST).read_text())
    assert resumed["shards"] == whole["shards"]
    for entry in whole["shards"]:
        with safe_open(str(tmp_path / "whole" / entry["file"]), "pt") as a, safe_open(
            str(tmp_path / "resumed" / entry["file"]), "pt"
        ) as b:
            assert all(torch.equal(a.get_tensor(name), b.get_tensor(name)) for name in a.keys())  # noqa: SIM118


def test_a_manifest_whose_parts_leave_a_gap_is_refused(split_train_labels, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(split_train_labels, broken)
    manifest = json.loads((broken / MANIFEST).read_text())
    manifest["shards"].pop(1)
    (broken / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="do not cover it once"):
        LabelShards(broken)


def test_a_part_is_read_into_one_buffer_and_a_truncated_shard_is_an_error(split_train_labels, tmp_path):
    shards = LabelShards(split_train_labels)
    data = shards.load_part(3, 1)
    assert len({tensor.untyped_storage().data_ptr() for tensor in data.values()}) == 1  # one transfer moves it
    copy = tmp_path / "labels"
    shutil.copytree(split_train_labels, copy)
    opened = LabelShards(copy)  # opening checks each shard whole: this one is cut while training reads it
    path = opened.documents[3].parts[1].path
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(OSError, match="ends before"):
        opened.load_part(3, 1, list(data))  # names given: the reader opens no safetensors header
