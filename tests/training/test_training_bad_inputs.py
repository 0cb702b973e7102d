"""Bad inputs fail with an error that says what to do, and leave nothing half-written behind."""

import json
import shutil

import pytest
from training_helpers import as_documents, dump_config, small_train_config
from transformers import LlamaConfig, LlamaForCausalLM

from fm_transformers.document import Document
from fm_transformers.indexer import MemoryIndexerModel
from fm_transformers.tiny import tiny_deepseek_v4_config
from fm_transformers.training import shards as shards_module
from fm_transformers.training.cli import load_backbone
from fm_transformers.training.documents import read_jsonl
from fm_transformers.training.dump import dump_labels
from fm_transformers.training.labels import LabelConfig
from fm_transformers.training.shards import LabelShards
from fm_transformers.training.synthetic import needle_documents
from fm_transformers.training.trainer import train


def tiny_llama():
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    return LlamaForCausalLM(config)


def test_a_document_shorter_than_the_sliding_window_is_refused_before_anything_is_written(backbone, tmp_path):
    documents = as_documents(needle_documents(2, 96, seed=0)) + [Document("short", list(range(3, 13)))]
    with pytest.raises(ValueError, match="document 'short' has 10 tokens.*sliding window is 16"):
        dump_labels(backbone, documents, tmp_path / "labels", dump_config(), "tiny")
    assert not (tmp_path / "labels").exists()


def test_a_document_without_a_whole_lookahead_window_is_refused(backbone, tmp_path):
    documents = [Document("no-window", [5] * 20)]
    with pytest.raises(ValueError, match="at least 32.*lower --warmup / --tau"):
        dump_labels(backbone, documents, tmp_path / "labels", dump_config(labels=LabelConfig(tau=16)), "tiny")


def test_a_model_that_is_not_deepseek_v4_is_refused(tmp_path):
    documents = as_documents(needle_documents(1, 96, seed=0))
    with pytest.raises(ValueError, match="DeepSeek-V4"):
        dump_labels(tiny_llama(), documents, tmp_path / "labels", dump_config(), "llama")
    assert not (tmp_path / "labels").exists()


def test_the_cli_refuses_a_non_deepseek_checkpoint_before_loading_weights(tmp_path):
    tiny_llama().config.save_pretrained(tmp_path / "llama")  # a config and no weights: loading them would fail
    with pytest.raises(ValueError, match="'llama' model: labels need a DeepSeek-V4"):
        load_backbone(str(tmp_path / "llama"))


def test_target_layers_must_be_csa_layers(backbone, tmp_path):
    documents = as_documents(needle_documents(1, 96, seed=0))
    with pytest.raises(ValueError, match=r"\[3\] are not CSA layers.*\[2, 4, 6, 7\]"):
        dump_labels(backbone, documents, tmp_path / "labels", dump_config(target_layers=(3, 4)), "tiny")


def test_token_ids_outside_the_vocabulary_are_refused(backbone, tmp_path):
    with pytest.raises(ValueError, match="token id 999 .* vocabulary has 99"):
        dump_labels(backbone, [Document("big", [999] * 64)], tmp_path / "labels", dump_config(), "tiny")


@pytest.mark.parametrize("content", ["", "\n  \n"], ids=["empty", "blank-lines"])
def test_an_empty_jsonl_is_refused(tmp_path, content):
    path = tmp_path / "docs.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match="holds no documents"):
        read_jsonl(path)


@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", "line 1 is not valid JSON"),
        ('{"title": "x"}', 'neither "text" nor "input_ids"'),
        ('{"input_ids": [1, -2]}', "list of non-negative integers"),
        ('{"text": "hello"}', "no tokenizer was given"),
    ],
)
def test_malformed_lines_say_which_line_and_what_is_wrong(tmp_path, line, message):
    path = tmp_path / "docs.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=message):
        read_jsonl(path)


def test_a_missing_jsonl_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_a_crash_while_writing_a_shard_leaves_no_partial_file(backbone, tmp_path, monkeypatch):
    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(shards_module, "save_file", broken_save)
    documents = as_documents(needle_documents(1, 96, seed=0))
    with pytest.raises(OSError, match="disk full"):
        dump_labels(backbone, documents, tmp_path / "labels", dump_config(), "tiny")
    assert list((tmp_path / "labels").iterdir()) == []


def test_a_full_directory_that_is_not_a_dump_is_not_written_into(backbone, tmp_path):
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="choose a new --output"):
        dump_labels(backbone, as_documents(needle_documents(1, 96)), tmp_path / "labels", dump_config(), "tiny")


def test_resuming_with_other_settings_is_refused(backbone, tmp_path):
    documents = as_documents(needle_documents(1, 96, seed=0))
    dump_labels(backbone, documents, tmp_path / "labels", dump_config(), "tiny")
    with pytest.raises(ValueError, match="started with other labels"):
        config = dump_config(labels=LabelConfig(tau=8))
        dump_labels(backbone, documents, tmp_path / "labels", config, "tiny")


def test_a_shard_from_another_backbone_is_refused(heldout_labels, other_backbone_labels, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(heldout_labels, mixed)
    shutil.copyfile(other_backbone_labels / "shard-00000.safetensors", mixed / "shard-00000.safetensors")
    with pytest.raises(ValueError, match="made from another backbone.*own directory"):
        LabelShards(mixed)


def test_held_out_labels_from_another_backbone_are_refused_before_training(
    train_labels, other_backbone_labels, tmp_path
):
    config = small_train_config(train_labels, tmp_path / "out", eval_data=str(other_backbone_labels), max_steps=1)
    with pytest.raises(ValueError, match="tiny-seed-1.*tiny-seed-0.*same backbone"):
        train(config)
    assert not (tmp_path / "out").exists()


def test_starting_from_an_indexer_of_another_backbone_is_refused(train_labels, tmp_path):
    other = MemoryIndexerModel.from_backbone(tiny_deepseek_v4_config(hidden_size=32), layers=[4], num_heads=2, rank=8)
    other.save_pretrained(tmp_path / "other")
    config = small_train_config(train_labels, tmp_path / "out", init_from=str(tmp_path / "other"), max_steps=1)
    with pytest.raises(ValueError, match="hidden_size=32.*hidden_size=64"):
        train(config)


def test_a_directory_without_a_manifest_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="fm-indexer dump-labels"):
        LabelShards(tmp_path)


def test_a_manifest_of_another_format_version_is_refused(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "fm-indexer-labels", "version": 99}))
    with pytest.raises(ValueError, match="dump the labels again"):
        LabelShards(tmp_path)
