"""Probe: which chunk keys would let a lookahead predictor find what the next tau tokens read?

The memory indexer scores the chunks' 32-dim native index keys (the paper's design). This probe trains the same
query tower (low rank, norm, heads, relu dots, head weights; one per target layer, the max over layers) on the same
dump's labels, triggers and hidden states against the index keys, against the chunks' main compressed KV (the
attention's own entries, head_dim wide), which a backbone forward over each document recomputes, and against that
KV through a learned projection to the index keys' width (what LSA could keep on the device). Each is read by the
project's gate (fm_transformers.eval.gate) on the validation split and on the training split itself, whose gap
says how much of what is learnt is memorised.

    python examples/probe_indexer_keys.py --backbone checkpoints/backbone-bf16 \\
        --labels runs/cpu16/tau16/evidence-window --length 2048 --cache-dir runs/cpu16/probe-cache --out keys.json

--labels is one label set of `train_eval_indexer.py` (its train/ and validation/); --length, --seed, --spacing and
--align must be those the dump ran with: the documents are drawn again, and a document whose recomputed index keys
differ from the dumped ones in over a tenth of its chunks stops the probe. Departs from the trainer in its loss (focal
over every visible chunk, no sampled negatives) and batching (whole documents); with index keys it lands where the
trainer does.
"""

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoModelForCausalLM, DynamicCache

from fm_transformers.eval.gate import gate_metrics, label_scores
from fm_transformers.eval.indexer_data import question_documents
from fm_transformers.training import LabelShards

# the native indexer's compressed keys; the attention's compressed KV; that KV through a learned projection to the
# index keys' width (keys LSA could keep on the device as it keeps the index keys)
KEY_KINDS = ("index", "main", "main-projected")
SPLITS = ("validation", "train")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", required=True, help="the backbone the labels were dumped with")
    parser.add_argument("--labels", required=True, help="a label set directory holding train/ and validation/")
    parser.add_argument("--keys", default=",".join(KEY_KINDS), help=f"key kinds to compare, of {KEY_KINDS}")
    parser.add_argument("--length", type=int, required=True, help="the dump's --length")
    parser.add_argument("--seed", type=int, default=0, help="the dump's --seed")
    parser.add_argument("--spacing", type=int, default=320, help="the dump's --spacing")
    parser.add_argument("--align", type=int, default=64, help="the dump's --align")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--documents-per-step", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--train-seed", type=int, default=0, help="seeds the weights and the document draws")
    parser.add_argument("--budget", type=float, default=0.1, help="the gate's resident budget")
    parser.add_argument("--recency-chunks", type=int, default=16)
    parser.add_argument("--cache-dir", help="keep the main KV here (a forward a document) for later runs")
    parser.add_argument("--out", default="probe_indexer_keys.json")
    args = parser.parse_args()
    args.keys = args.keys.split(",")
    unknown = sorted(set(args.keys) - set(KEY_KINDS))
    if unknown:
        parser.error(f"--keys {unknown} unknown: choose among {KEY_KINDS}")
    for split in SPLITS:
        if not (Path(args.labels) / split / "manifest.json").is_file():
            parser.error(
                f"{Path(args.labels) / split} holds no label set: point --labels at one of train_eval_indexer's"
            )
    return args


def main_kv(args, split: str, docs: dict[str, dict]) -> dict[str, dict[int, torch.Tensor]]:
    """{doc_id: {layer: (chunks, head_dim)}} the main compressed KV of each document of `split` (`docs`, from
    `documents`), from a forward of the backbone over the document drawn again (its index keys checked against the
    dumped ones), kept in --cache-dir."""
    cached = Path(args.cache_dir) / f"main-kv-{split}.pt" if args.cache_dir else None
    if cached is not None and cached.is_file():
        out = torch.load(cached)
        if sorted(out) != sorted(docs):
            raise SystemExit(f"error: {cached} holds other documents than {args.labels}/{split}: remove it")
        return out
    backbone = AutoModelForCausalLM.from_pretrained(args.backbone, dtype=torch.float32).eval()
    drawn = question_documents(len(docs), args.length, split, args.seed, args.spacing, args.align)
    out = {}
    for (document, _), (doc_id, doc) in zip(tqdm(drawn, desc=f"main KV, {split}"), docs.items(), strict=True):
        cache = DynamicCache(config=backbone.config)
        ids = torch.tensor([document.input_ids])
        with torch.no_grad():
            for start in range(0, ids.shape[1], 1024):
                piece = ids[:, start : start + 1024]
                backbone(input_ids=piece, past_key_values=cache, use_cache=True, logits_to_keep=1)
        out[document.doc_id] = {}
        for layer, index_keys in doc["keys"].items():
            chunks = index_keys.shape[0]
            compressed = cache.layers[layer].compressed_kv
            # the dump's batched forwards differ in rounding and, past near ties of the native top-k, in a few
            # chunks of deep layers; another document differs in nearly every chunk
            agree = (compressed["indexer"][0, :chunks] - index_keys).abs().amax(1) < 1e-3
            if document.doc_id != doc_id or agree.float().mean() < 0.9:
                raise SystemExit(
                    f"error: document {document.doc_id} drawn again does not match the dump's: pass the --length, "
                    "--seed, --spacing and --align the dump ran with, and the backbone it used"
                )
            out[document.doc_id][layer] = compressed["compressor"][0, :chunks].clone()
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.save(out, cached)
    return out


class QueryTower(torch.nn.Module):
    """One target layer's scorer, shaped as the memory indexer's; keys are RMS-normalised (the kinds differ in
    scale), after a learned projection to `project` dims where given."""

    def __init__(self, hidden: int, key_dim: int, heads: int, rank: int, project: int | None = None):
        super().__init__()
        self.project = None if project is None else torch.nn.Linear(key_dim, project, bias=False)
        key_dim = project or key_dim
        self.heads, self.key_dim = heads, key_dim
        self.down = torch.nn.Linear(hidden, rank, bias=False)
        self.norm = torch.nn.RMSNorm(rank)
        self.up = torch.nn.Linear(rank, heads * key_dim, bias=False)
        self.head_weights = torch.nn.Linear(hidden, heads, bias=False)
        self.key_norm = torch.nn.RMSNorm(key_dim)

    def forward(self, hidden: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """hidden (triggers, hidden), keys (chunks, key_dim) -> logits (triggers, chunks)."""
        keys = keys if self.project is None else self.project(keys)
        q = self.up(self.norm(self.down(hidden))).view(-1, self.heads, self.key_dim)
        dots = torch.einsum("thd,cd->thc", q, self.key_norm(keys)) / self.key_dim**0.5
        return (F.relu(dots) * self.head_weights(hidden).unsqueeze(-1)).sum(1)


def documents(shards: LabelShards, layers: list[int]) -> dict[str, dict]:
    """Per document: hidden states and index keys per layer, labels (triggers, chunks), visible chunks per trigger."""
    out = {}
    for index, ref in enumerate(shards.documents):
        data = shards.load(index)
        triggers = torch.arange(data["positions"].numel())
        labels = label_scores(data, triggers)  # 1 where labelled: (triggers, chunks)
        out[ref.doc_id] = {
            "hidden": {layer: data[f"hidden/{layer}"].float() for layer in layers},
            "keys": {layer: data[f"keys/{layer}"].float() for layer in layers},
            "labels": labels,
            "visible": torch.arange(labels.shape[1]) < ((data["positions"] + 1) // shards.compress_rate).unsqueeze(1),
        }
    return out


def with_main_keys(docs: dict[str, dict], main: dict[str, dict[int, torch.Tensor]]) -> dict[str, dict]:
    """The documents with their main compressed KV in place of the index keys."""
    out = {}
    for doc_id, doc in docs.items():
        keys = {layer: main[doc_id][layer][: index_keys.shape[0]].float() for layer, index_keys in doc["keys"].items()}
        out[doc_id] = {**doc, "keys": keys}
    return out


def train(args, docs: dict, layers: list[int], project: int | None) -> torch.nn.ModuleDict:
    first = next(iter(docs.values()))
    towers = torch.nn.ModuleDict({
        str(layer): QueryTower(first["hidden"][layer].shape[1], first["keys"][layer].shape[1], args.heads, args.rank,
                               project)
        for layer in layers
    })
    optimizer = torch.optim.AdamW(towers.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.steps, pct_start=0.1)
    listed = list(docs.values())
    for _ in tqdm(range(args.steps), desc="train"):
        loss = torch.zeros(())
        for index in torch.randint(len(listed), (args.documents_per_step,)).tolist():
            doc = listed[index]
            for layer in layers:
                logits = towers[str(layer)](doc["hidden"][layer], doc["keys"][layer])
                p, y = torch.sigmoid(logits), doc["labels"]
                focal = F.binary_cross_entropy_with_logits(logits, y, reduction="none") * (p - y).abs() ** 2
                loss = loss + (focal * doc["visible"]).sum() / doc["visible"].sum()
        optimizer.zero_grad()
        (loss / args.documents_per_step).backward()
        optimizer.step()
        schedule.step()
    return towers


def scorer(towers: torch.nn.ModuleDict, docs: dict, layers: list[int]):
    """The gate's scorer: each trigger's sigmoid scores, the max over the target layers (as LSA's OR-union)."""

    def scores(doc_id: str, data: dict, rows: torch.Tensor) -> torch.Tensor:
        doc = docs[doc_id]
        with torch.no_grad():
            per_layer = [
                torch.sigmoid(towers[str(layer)](doc["hidden"][layer], doc["keys"][layer])) for layer in layers
            ]
        return torch.stack(per_layer).amax(0)[rows]

    return scores


def main() -> None:
    args = parse_args()
    root = Path(args.labels)
    shards = {split: LabelShards(root / split) for split in SPLITS}
    layers = [int(layer) for layer in shards["train"].manifest["target_layers"]]
    results = {"settings": vars(args), "layers": layers, "key_dims": {}, "gate": {}}
    indexed = {split: documents(shards[split], layers) for split in SPLITS}
    index_width = next(iter(indexed["train"].values()))["keys"][layers[0]].shape[1]
    main = {}
    if any(kind.startswith("main") for kind in args.keys):
        main = {split: with_main_keys(indexed[split], main_kv(args, split, indexed[split])) for split in SPLITS}
    for kind in args.keys:
        started = time.monotonic()
        torch.manual_seed(args.train_seed)
        docs = main if kind.startswith("main") else indexed
        project = index_width if kind == "main-projected" else None
        results["key_dims"][kind] = project or next(iter(docs["train"].values()))["keys"][layers[0]].shape[1]
        towers = train(args, docs["train"], layers, project)
        for split in SPLITS:
            metrics = gate_metrics(
                None, root / split, budget=args.budget, recency_chunks=args.recency_chunks, sink_chunks=1,
                scorer=scorer(towers, docs[split], layers),
            )
            results["gate"][f"{kind}/{split}"] = metrics
            every = metrics["all"]
            print(
                f"{kind:14s} keys, {split:10s}: at the {args.budget:.0%} budget, window evidence "
                f"{every['budget_window_evidence_recall']:.3f}, "
                f"question evidence {every['budget_evidence_recall']:.3f}, "
                f"native top-k {every['budget_used_recall']:.3f} ({time.monotonic() - started:.0f} s)",
                flush=True,
            )
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
