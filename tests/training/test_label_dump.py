"""The label dump against a naive per-token recomputation, its manifest, causality and resumption."""

import logging
from collections import Counter

import pytest
import torch
from training_helpers import DOC_TOKENS, TARGET_LAYERS, TAU, as_documents, dump_config

from fm_transformers.document import Document
from fm_transformers.tiny import tiny_deepseek_v4
from fm_transformers.training import dump as dump_module
from fm_transformers.training.dump import dump_labels
from fm_transformers.training.labels import LabelConfig
from fm_transformers.training.shards import LabelShards
from fm_transformers.training.synthetic import needle_documents

CSA = (2, 4, 6, 7)
RATE = 4


class RawRecorder:
    """Independent hooks that keep everything the dump throws away: whole score rows, picks, hidden states."""

    def __init__(self, model):
        self.scores = {layer: {} for layer in CSA}  # layer -> position -> scores over all chunks so far
        self.picks = {layer: {} for layer in CSA}  # layer -> position -> native top-k (with -1)
        self.hidden = {layer: {} for layer in TARGET_LAYERS}
        self.keys = {}
        self._pending = {}
        self.handles = []
        for layer in CSA:
            indexer = model.model.layers[layer].self_attn.compressor.indexer
            self.handles.append(indexer.scorer.register_forward_hook(self._on_scores(layer)))
            self.handles.append(indexer.register_forward_hook(self._on_picks(layer)))
        for layer in TARGET_LAYERS:
            attention = model.model.layers[layer].self_attn
            self.handles.append(attention.register_forward_pre_hook(self._on_hidden(layer), with_kwargs=True))

    def _on_scores(self, layer):
        def hook(module, args, output):
            self._pending[layer] = output[0].clone()
            self.keys[layer] = args[1][0].clone()

        return hook

    def _on_picks(self, layer):
        def hook(module, args, output):
            for row, position in enumerate(args[2][0].tolist()):
                self.scores[layer][position] = self._pending[layer][row]
                self.picks[layer][position] = output[0, row].tolist()

        return hook

    def _on_hidden(self, layer):
        def hook(module, args, kwargs):
            for row, position in enumerate(kwargs["position_ids"][0].tolist()):
                self.hidden[layer][position] = args[0][0, row].clone()

        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


def reference_nucleus(row: torch.Tensor, visible: int, top_k: int, mass: float) -> set[int]:
    """One token, one layer, written the slow obvious way."""
    order = sorted(range(visible), key=lambda chunk: (-row[chunk].item(), chunk))[:top_k]
    if not order:
        return set()
    probs = torch.softmax(row[order].float(), dim=0).tolist()
    kept, total = [], 0.0
    for chunk, prob in zip(order, probs, strict=True):
        if total >= mass:
            break
        kept.append(chunk)
        total += prob
    floor = min(probs[: len(kept)])
    return set(kept) | {chunk for chunk, prob in zip(order, probs, strict=True) if prob >= floor}


def reference_document(recorder: RawRecorder, seq_len: int, vote: int, mass: float = 0.6, top_k: int = 6):
    golden = {}
    for position in range(seq_len):
        visible = (position + 1) // RATE
        counts = Counter()
        for layer in CSA:
            counts.update(reference_nucleus(recorder.scores[layer][position], visible, top_k, mass))
        golden[position] = {chunk for chunk, count in counts.items() if count >= vote}
    labels, used = [], []
    for trigger in range(16, seq_len - TAU + 1, TAU):
        limit = (trigger + 1) // RATE
        window = range(trigger, trigger + TAU)
        labels.append(sorted({chunk for t in window for chunk in golden[t] if chunk < limit}))
        picks = Counter(c for t in window for layer in CSA for c in recorder.picks[layer][t] if 0 <= c < limit)
        used.append(dict(sorted(picks.items())))
    return labels, used


def csr_rows(data, name):
    indptr, indices = data[f"{name}/indptr"], data[f"{name}/indices"]
    return [indices[indptr[i] : indptr[i + 1]].tolist() for i in range(indptr.numel() - 1)]


def test_dump_matches_a_per_token_recomputation_from_raw_scores(backbone, tmp_path):
    document = as_documents(needle_documents(1, DOC_TOKENS, seed=7))
    recorder = RawRecorder(backbone)
    try:
        dump_labels(backbone, document, tmp_path / "labels", dump_config(chunk_size=96), "tiny")
    finally:
        recorder.remove()
    data = LabelShards(tmp_path / "labels").load(0)
    labels, used = reference_document(recorder, DOC_TOKENS, vote=3)
    assert csr_rows(data, "labels") == labels
    counts = data["used/counts"].tolist()
    stored_used = []
    for row in csr_rows(data, "used"):
        stored_used.append({chunk: counts.pop(0) for chunk in row})
    assert stored_used == used
    positions = data["positions"].tolist()
    for layer in TARGET_LAYERS:
        expected = torch.stack([recorder.hidden[layer][position] for position in positions])
        assert torch.equal(data[f"hidden/{layer}"], expected)
        assert torch.equal(data[f"keys/{layer}"], recorder.keys[layer])
    assert sum(map(len, labels)) > 0, "the needle document should produce golden labels"


def test_manifest_names_the_backbone_and_the_label_settings(train_labels, train_documents):
    shards = LabelShards(train_labels)
    manifest = shards.manifest
    assert manifest["complete"] is True
    assert manifest["backbone"]["name_or_path"] == "tiny-seed-0"
    assert manifest["backbone"]["config"]["hidden_size"] == 64
    assert manifest["backbone"]["csa_layers"] == list(CSA)
    assert manifest["labels"] == {"tau": TAU, "nucleus": 0.6, "vote": 3, "warmup": 16, "vote_applied": 3}
    assert manifest["target_layers"] == list(TARGET_LAYERS)
    assert [document.doc_id for document in shards.documents] == [d.doc_id for d in train_documents]
    assert len(manifest["shards"]) == 4  # 16 documents, 4 a shard


def test_stored_tensors_have_the_documented_shapes(train_labels):
    data = LabelShards(train_labels).load(0)
    triggers = list(range(16, DOC_TOKENS - TAU + 1, TAU))
    assert data["positions"].tolist() == triggers
    for layer in TARGET_LAYERS:
        assert data[f"hidden/{layer}"].shape == (len(triggers), 64)
        assert data[f"keys/{layer}"].shape == (DOC_TOKENS // RATE, 16)
    assert data["labels/indptr"].shape == (len(triggers) + 1,)
    assert data["used/counts"].shape == data["used/indices"].shape


def test_no_label_names_a_chunk_that_does_not_exist_at_its_trigger(train_labels):
    shards = LabelShards(train_labels)
    for index in range(len(shards.documents)):
        data = shards.load(index)
        limits = ((data["positions"] + 1) // RATE).tolist()
        for name in ("labels", "used"):
            for limit, row in zip(limits, csr_rows(data, name), strict=True):
                assert all(0 <= chunk < limit for chunk in row)


def test_golden_labels_are_a_subset_of_the_used_chunks(train_labels):
    data = LabelShards(train_labels).load(1)
    for golden, used in zip(csr_rows(data, "labels"), csr_rows(data, "used"), strict=True):
        assert set(golden) <= set(used)


def test_an_interrupted_dump_resumes_to_the_same_result(backbone, tmp_path, monkeypatch):
    documents = as_documents(needle_documents(3, 96, seed=3))
    config = dump_config(docs_per_shard=1)
    dump_labels(backbone, documents, tmp_path / "whole", config, "tiny")

    real = dump_module.label_documents
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(dump_module, "label_documents", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        dump_labels(backbone, documents, tmp_path / "resumed", config, "tiny")
    partial = LabelShards(tmp_path / "resumed")
    assert partial.manifest["complete"] is False and len(partial.documents) == 2
    assert not list((tmp_path / "resumed").glob("*.tmp"))

    monkeypatch.setattr(dump_module, "label_documents", real)
    dump_labels(backbone, documents, tmp_path / "resumed", config, "tiny")
    whole, resumed = LabelShards(tmp_path / "whole"), LabelShards(tmp_path / "resumed")
    assert resumed.manifest["complete"] is True
    for index in range(3):
        first, second = whole.load(index), resumed.load(index)
        assert first.keys() == second.keys()
        assert all(torch.equal(first[name], second[name]) for name in first)


def test_documents_of_several_lengths_in_one_batch_are_labelled_as_one_at_a_time(backbone, tmp_path):
    """Right-padding a batch must change no document's labels, hidden states or keys: the shorter documents
    (lengths 300, 317, 320, 333) see only their own tokens, and nothing of the padding is written."""
    documents = [
        Document(f"doc{index}", record["input_ids"][:length])
        for index, (record, length) in enumerate(zip(needle_documents(4, 333, seed=5), (333, 300, 317, 320)))
    ]
    dump_labels(backbone, documents, tmp_path / "single", dump_config(chunk_size=96, batch_size=1), "tiny")
    dump_labels(backbone, documents, tmp_path / "batched", dump_config(chunk_size=96, batch_size=3), "tiny")
    single, batched = LabelShards(tmp_path / "single"), LabelShards(tmp_path / "batched")
    for index in range(len(documents)):
        alone, together = single.load(index), batched.load(index)
        assert alone.keys() == together.keys()
        assert alone["keys/4"].shape[0] == len(documents[index].input_ids) // RATE
        for name in alone:
            if name.startswith(("hidden/", "keys/")):
                torch.testing.assert_close(together[name], alone[name], rtol=1e-5, atol=1e-5)
            else:
                assert torch.equal(together[name], alone[name]), (index, name)


def test_a_backbone_with_fewer_csa_layers_than_the_vote_clamps_it(tmp_path, caplog):
    layer_types = [
        "sliding_attention",
        "sliding_attention",
        "compressed_sparse_attention",
        "compressed_sparse_attention",
    ]
    model = tiny_deepseek_v4(seed=0, layer_types=layer_types)
    documents = as_documents(needle_documents(1, 64, seed=0))
    with caplog.at_level(logging.WARNING):
        manifest = dump_labels(model, documents, tmp_path / "labels", dump_config(target_layers=(3,)), "two-csa")
    assert manifest["labels"]["vote"] == 3 and manifest["labels"]["vote_applied"] == 2
    assert "using a vote of 2" in caplog.text


def test_warmup_and_tau_set_the_trigger_steps(backbone, tmp_path):
    documents = as_documents(needle_documents(1, 100, seed=0))
    config = dump_config(labels=LabelConfig(tau=8, warmup=40))
    dump_labels(backbone, documents, tmp_path / "labels", config, "tiny")
    assert LabelShards(tmp_path / "labels").load(0)["positions"].tolist() == list(range(40, 93, 8))
