"""The oracle lookahead: at each recall, the chunks the native top-k of a stock run really picked over the next tau
decode steps, in any CSA layer. The ceiling of any tau-step predictor at the same budget: with the budget
uncapped it reproduces the stock generation token for token (tested).

`NativePicks` records the stock run's picks at every one-token forward; `lookahead_sets` cuts them into the
windows of LSA's schedule: the recall after the prompt serves decode forwards 1..tau, recall i (fired during
forward i tau) serves forwards i tau + 1 .. (i + 1) tau. Only chunks that exist at the recall count (newer ones
are in the tail, always candidates). Under a budget the chunks picked most often are kept; the sets go to
`policies.OraclePolicy`.
"""

import torch
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4Indexer

from ..config import LSAConfig
from ..layout import csa_layers


class NativePicks:
    """Context manager: the native indexer's top-k of every CSA layer at each one-token forward.
    `steps[f]`: (batch, CSA layers x k) chunk ids of decode forward f + 1, -1 for empty slots, kept on the model's
    device (a copy to the host each step would make the reference run wait for the device); `host_steps()`
    brings them over once the run is over."""

    def __init__(self, model):
        self.indexers = [model.model.layers[i].self_attn.compressor.indexer for i in csa_layers(model.config)]
        self.steps: list[torch.Tensor] = []
        self._current: list[torch.Tensor] = []
        self._handles = []

    def __enter__(self) -> "NativePicks":
        for indexer in self.indexers:
            if not isinstance(indexer, DeepseekV4Indexer):
                raise TypeError("NativePicks reads the stock DeepseekV4Indexer: record a stock-cache generation")
            self._handles.append(indexer.register_forward_hook(self._hook))
        return self

    def _hook(self, module, args, top_k):  # top_k: (batch, seq, k)
        if top_k.shape[1] != 1:
            return
        self._current.append(top_k[:, 0].detach())
        if len(self._current) == len(self.indexers):
            self.steps.append(torch.cat(self._current, dim=1))
            self._current = []

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def host_steps(self) -> list[torch.Tensor]:
        return [step.cpu() for step in self.steps]


def lookahead_sets(
    steps: list[torch.Tensor], tau: int, prompt_length: int, compress_rate: int, config: LSAConfig
) -> list[list[torch.Tensor]]:
    """Per recall, per sequence: the chunk ids to keep besides the recency tail and sink, at most the budget's
    room for them, most picked first (then newest)."""
    sets, batch = [], steps[0].shape[0] if steps else 1
    for trigger in range(1 + len(steps) // tau if steps else 1):
        chunks = (prompt_length + trigger * tau) // compress_rate  # made by the forward that fires the recall
        window = steps[trigger * tau : (trigger + 1) * tau]
        ids = torch.arange(chunks)
        forced = (ids >= chunks - config.recency_chunks) | (ids < config.sink_chunks)
        budget = config.budget_chunks(chunks)
        room = None if budget is None else max(0, budget - int(forced.sum()))
        picks = torch.cat(window, dim=1) if window else torch.empty(batch, 0, dtype=torch.long)
        sets.append([_most_picked(row, chunks, forced, room) for row in picks])
    return sets


def _most_picked(picks: torch.Tensor, chunks: int, forced: torch.Tensor, room: int | None) -> torch.Tensor:
    counts = torch.bincount(picks[(picks >= 0) & (picks < chunks)], minlength=chunks).float()
    counts[forced] = 0
    picked = counts.nonzero().flatten()
    order = torch.argsort(counts[picked] * chunks + picked.float(), descending=True)  # most picked, then newest
    return picked[order[:room]] if room is not None else picked[order]
