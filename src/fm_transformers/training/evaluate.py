"""Held-out evaluation of a memory indexer against its labels and against what the native indexer used.

At each trigger step the indexer scores every visible chunk at each of its layers; a chunk is selected if its
score reaches the threshold in at least one layer (the inference rule). Reported:
- precision / recall / F1 of the selection against the golden lookahead labels (micro-averaged);
- resident_fraction: mean share of the visible chunks selected;
- used_recall: share of the native top-k picks (every CSA layer, every token of the window) that fall in the
  selection — the level-2 indexer only reproduces the stock model where this is 1 — and used_chunk_recall,
  the same over distinct chunks;
- the same numbers for a recency selector given, at every trigger, exactly as many chunks as the indexer took
  (the newest ones): the baseline an indexer has to beat for its memory to be worth anything.
"""

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .labels import visible_chunks
from .shards import LabelShards


@dataclass
class _Counts:
    true_positive: float = 0.0
    selected: float = 0.0
    golden: float = 0.0
    used_picks_hit: float = 0.0
    used_picks: float = 0.0
    used_chunks_hit: float = 0.0
    used_chunks: float = 0.0
    fraction_sum: float = 0.0
    triggers: int = 0

    def add(self, selected, golden, used_counts, visible) -> None:
        """All (triggers, chunks): selected/golden bool, used_counts int (0 where unused); visible (triggers,)."""
        self.true_positive += (selected & golden).sum().item()
        self.selected += selected.sum().item()
        self.golden += golden.sum().item()
        self.used_picks_hit += (used_counts * selected).sum().item()
        self.used_picks += used_counts.sum().item()
        self.used_chunks_hit += ((used_counts > 0) & selected).sum().item()
        self.used_chunks += (used_counts > 0).sum().item()
        has_history = visible > 0
        self.fraction_sum += (selected.sum(-1)[has_history] / visible[has_history]).sum().item()
        self.triggers += int(has_history.sum())

    def metrics(self) -> dict:
        precision = self.true_positive / max(self.selected, 1)
        recall = self.true_positive / max(self.golden, 1)
        return {
            "precision": precision,
            "recall": recall,
            "f1": 2 * precision * recall / max(precision + recall, 1e-12),
            "resident_fraction": self.fraction_sum / max(self.triggers, 1),
            "used_recall": self.used_picks_hit / max(self.used_picks, 1),
            "used_chunk_recall": self.used_chunks_hit / max(self.used_chunks, 1),
        }


@torch.no_grad()
def evaluate(model, shards: LabelShards, threshold: float = 0.5, triggers_per_batch: int = 64) -> dict:
    """Metrics of `model` (a MemoryIndexerModel) on every trigger of `shards`, with the recency baseline."""
    layers = [int(layer) for layer in model.config.layers]
    missing = [layer for layer in layers if layer not in shards.target_layers]
    if missing:
        raise ValueError(
            f"the indexer has layers {missing} that {shards.directory} did not dump (it has {shards.target_layers}): "
            f"evaluate on labels dumped for the indexer's layers"
        )
    was_training = model.training
    model.eval()
    indexer, recency = _Counts(), _Counts()
    for doc in tqdm(range(len(shards.documents)), desc="eval", unit="doc"):
        data = shards.load(doc)
        for start in range(0, data["positions"].numel(), triggers_per_batch):
            rows = slice(start, start + triggers_per_batch)
            scores = _scores(model, layers, data, rows)  # (triggers, chunks)
            positions = data["positions"][rows]
            visible = visible_chunks(positions, shards.compress_rate)
            existing = torch.arange(scores.shape[-1]) < visible.unsqueeze(-1)
            selected = (scores >= threshold) & existing
            golden = _dense(data, "labels", rows, scores.shape[-1]) > 0
            used = _dense(data, "used", rows, scores.shape[-1])
            indexer.add(selected, golden, used, visible)
            newest = torch.arange(scores.shape[-1]) >= (visible - selected.sum(-1)).unsqueeze(-1)
            recency.add(newest & existing, golden, used, visible)
    model.train(was_training)
    return {
        **indexer.metrics(),
        "threshold": threshold,
        "documents": len(shards.documents),
        "triggers": indexer.triggers,
        "recency": recency.metrics(),
    }


def _scores(model, layers: list[int], data: dict, rows: slice) -> torch.Tensor:
    device, dtype = model.device, model.dtype
    positions = data["positions"][rows].unsqueeze(0).to(device)
    best = None
    for layer in layers:
        hidden = data[f"hidden/{layer}"][rows].unsqueeze(0).to(device, dtype)
        keys = data[f"keys/{layer}"].unsqueeze(0).to(device)
        scores = model.scores(layer, hidden, positions, keys)[0].float().cpu()
        best = scores if best is None else torch.maximum(best, scores)
    return best


def _dense(data: dict, name: str, rows: slice, width: int) -> torch.Tensor:
    """Rows `rows` of a stored CSR set as a dense (triggers, chunks) tensor of counts (1 where no counts)."""
    indptr = data[f"{name}/indptr"]
    first, last = rows.start, min(rows.stop, indptr.numel() - 1)
    out = torch.zeros(last - first, width, dtype=torch.long)
    lengths = indptr[first + 1 : last + 1] - indptr[first:last]
    row_ids = torch.repeat_interleave(torch.arange(last - first), lengths)
    span = slice(int(indptr[first]), int(indptr[last]))
    values = data[f"{name}/counts"][span] if f"{name}/counts" in data else 1
    out[row_ids, data[f"{name}/indices"][span]] = values
    return out


def format_metrics(metrics: dict) -> str:
    """The metrics of `evaluate` as a table, the memory indexer beside the recency selector of the same size."""
    names = ("precision", "recall", "f1", "resident_fraction", "used_recall", "used_chunk_recall")
    lines = [
        f"held-out: {metrics['documents']} documents, {metrics['triggers']} trigger steps, threshold {metrics['threshold']}",
        f"{'metric':<20}{'memory indexer':>16}{'recency, same size':>20}",
    ]
    lines += [f"{name:<20}{metrics[name]:>16.3f}{metrics['recency'][name]:>20.3f}" for name in names]
    return "\n".join(lines)
