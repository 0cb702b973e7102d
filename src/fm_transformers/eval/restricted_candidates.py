"""Training under LSA's restriction: an answer's compressed candidates are a resident set, not the whole history.

Served by an LSA cache, every CSA layer's native top-k picks only among the resident chunks: what the memory
indexer kept (at best the evidence), the recency tail and the sink. A backbone trained with the whole history in
reach spreads its top-k over all of it and leans on picks that carry nothing of the answer, so small resident sets
lose its answers even when they hold the evidence (the probe, docs/evaluation.md). This stage departs from the
paper (DeepSeek-V4 was not trained for LSA): on a share of the long-task examples, the rows that decode the answer
may pick only the evidence chunks, a recency tail, the sink and a random share of the other chunks, so the answers
stop depending on which other chunks fill the top-k.

Two parts: `CandidateDraw` chooses, per example, the chunks its answer rows may pick (batches.py calls it with the
example's own generator, so a step's batch stays a function of (seed, step)); `CandidateRestriction` hooks every
CSA layer's native indexer and removes every other chunk from its top-k during the forward.
"""

import random
from dataclasses import dataclass

import torch
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4Indexer

from ..layout import csa_compress_rate, csa_layers
from .long_tasks import LONG_TASK_NAMES, evidence_chunks
from .tasks import Example


@dataclass(frozen=True)
class CandidateDraw:
    """share: the share of long-task examples trained restricted (the others see the whole history, as the full
    cache serves them); random_max: the random share of the other chunks that stays a candidate is uniform in
    [0, random_max]. The tail and the sink, candidates of every restricted row, are CandidateRestriction's."""

    share: float
    random_max: float
    compress_rate: int

    def __post_init__(self):
        for name in ("share", "random_max"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.compress_rate < 1:
            raise ValueError(f"compress_rate must be at least 1, got {self.compress_rate}")

    def draw(self, example: Example, chunks: int, rng: random.Random) -> list[int] | None:
        """The chunks (of `chunks` in the training row) the example's answer rows may pick besides the tail and
        the sink: its evidence and a random share of the rest. None: the example is not restricted (not a long
        task, or not drawn)."""
        if example.task not in LONG_TASK_NAMES or rng.random() >= self.share:
            return None
        evidence = {chunk for chunk in evidence_chunks(example, self.compress_rate) if chunk < chunks}
        others = [chunk for chunk in range(chunks) if chunk not in evidence]
        kept = rng.sample(others, round(rng.uniform(0.0, self.random_max) * len(others)))
        return sorted(evidence.union(kept))


class CandidateRestriction:
    """Context manager: hooks every CSA layer's native indexer on enter, removes the hooks on exit (even on error).

    `use(candidate_chunks, restricted_from, rows)` before a forward: row t of example b is restricted when t >=
    restricted_from[b]; it may then pick chunk s only when candidate_chunks[b, s], s is among the `tail_chunks`
    newest chunks complete at t, or s < sink_chunks (16 and 1: the evaluation's paper resident sets). Unrestricted
    rows and `use(None, None, rows)` leave the model as it is. The scores of every other chunk become -inf before
    the top-k, and a pick of one (when fewer candidates than the top-k are left) becomes -1, the stock "no entry"
    slot.
    """

    def __init__(self, model, tail_chunks: int = 16, sink_chunks: int = 1):
        self.model = model
        self.layers = csa_layers(model.config)
        self.rate = csa_compress_rate(model.config)
        self.tail_chunks, self.sink_chunks = tail_chunks, sink_chunks
        self._allowed: torch.Tensor | None = None  # (batch, rows, chunks) bool
        self._handles = []

    def __enter__(self) -> "CandidateRestriction":
        indexers = [self.model.model.layers[index].self_attn.compressor.indexer for index in self.layers]
        for index, indexer in zip(self.layers, indexers, strict=True):  # every layer checked before any is hooked
            if not isinstance(indexer, DeepseekV4Indexer):
                raise TypeError(f"layer {index} has no stock DeepseekV4Indexer: restrict an unpatched model")
            # first among the hooks, so that a distillation entered after it sees the restricted scores and picks;
            # by order of entry, not prepend=True: torch.compile (2.11) guards hooks by the dict's insertion order,
            # which prepending does not change, and then reads another hook's attributes off this one
            if indexer.scorer._forward_hooks or indexer._forward_hooks:
                raise RuntimeError(f"layer {index}'s indexer is already hooked: enter CandidateRestriction first")
        for indexer in indexers:
            self._handles += [
                indexer.scorer.register_forward_hook(self._on_scores),
                indexer.register_forward_hook(self._on_selection),
            ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._allowed = None

    def use(self, candidate_chunks: torch.Tensor | None, restricted_from: torch.Tensor | None, rows: int) -> None:
        """candidate_chunks: (batch, rows // rate) bool; restricted_from: (batch,) first restricted row; rows: the
        forward's sequence length."""
        if candidate_chunks is None:
            self._allowed = None
            return
        device = candidate_chunks.device
        chunks = candidate_chunks.shape[1]
        if chunks != rows // self.rate:
            raise ValueError(f"{chunks} candidate chunks for {rows} rows at {self.rate} tokens a chunk")
        row = torch.arange(rows, device=device)
        chunk = torch.arange(chunks, device=device)
        complete = (row + 1) // self.rate  # chunks complete at each row
        always = (chunk >= (complete - self.tail_chunks).unsqueeze(1)) | (chunk < self.sink_chunks)  # (rows, chunks)
        restricted = row >= restricted_from.to(device).unsqueeze(1)  # (batch, rows)
        self._allowed = ~restricted.unsqueeze(2) | candidate_chunks.unsqueeze(1) | always

    def _on_scores(self, module, args, scores):  # scores: (batch, rows, chunks) before the causal mask
        if self._allowed is None:
            return None
        if scores.shape != self._allowed.shape:
            raise RuntimeError(f"scores of shape {tuple(scores.shape)}, restriction for {tuple(self._allowed.shape)}")
        return scores.masked_fill(~self._allowed, float("-inf"))

    def _on_selection(self, module, args, picks):  # picks: (batch, rows, k), -1 where no causal entry is left
        if self._allowed is None:
            return None
        allowed = self._allowed.gather(-1, picks.clamp_min(0))
        return torch.where(allowed, picks, torch.full_like(picks, -1))
