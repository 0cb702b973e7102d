"""Hooks that read what the label dump needs out of a stock DeepSeek-V4 forward, without changing it.

Per forward call (one chunk of a batch of documents, right-padded to one length) they collect, per document:
- the hidden state entering each target layer's attention (after input_layernorm), at its trigger positions only;
- for every CSA layer, the native indexer's nucleus over its top-k (from `DeepseekV4IndexerScorer`'s scores,
  which come before the causal mask) and the top-k it actually handed to the attention (`DeepseekV4Indexer`'s
  output). The (chunk tokens x history) score matrix is reduced to (chunk tokens x k) inside the hook and
  dropped, so the dump never holds more than the backbone itself materializes for one chunk.
This module is the one place of the training side that knows the transformers module layout.
"""

from dataclasses import dataclass, field
from typing import Self

import torch
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4Indexer, DeepseekV4IndexerScorer

from ..layout import csa_compress_rate, csa_layers
from .labels import nucleus_top_k

@dataclass
class ForwardCapture:
    """What one forward (one chunk of a batch of documents) left behind; every document shares the positions.

    hidden: layer -> per document, (its triggers in the chunk, hidden); positions: (chunk tokens,);
    nucleus_sets: CSA layer -> (indices, keep), each (documents, chunk tokens, k);
    used: CSA layer -> (documents, chunk tokens, k) native top-k as handed to the attention, -1 for empty slots.
    """

    hidden: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    positions: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    nucleus_sets: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    used: dict[int, torch.Tensor] = field(default_factory=dict)


class IndexerCapture:
    """Context manager: registers the hooks on enter, removes them on exit (even on error).

    After each forward, `take()` returns what that forward produced and starts an empty capture for the next.
    `triggers` (one 1-D tensor of positions per document of the batch) selects which hidden states are kept; set
    it before the forward.
    """

    def __init__(self, model, target_layers: list[int], nucleus: float):
        config = model.config
        self.layers = model.model.layers
        self.csa_layers = csa_layers(config)
        self.target_layers = list(target_layers)
        self.top_k = config.index_topk
        self.compress_rate = csa_compress_rate(config)
        self.nucleus = nucleus
        self.triggers: list[torch.Tensor] = []
        self._handles = []
        self._scores: dict[int, torch.Tensor] = {}
        self._current = ForwardCapture()

    def __enter__(self) -> Self:
        for layer in self.target_layers:
            attention = self.layers[layer].self_attn
            self._handles.append(attention.register_forward_pre_hook(self._hidden_hook(layer), with_kwargs=True))
        for layer in self.csa_layers:
            indexer = self.layers[layer].self_attn.compressor.indexer
            if not isinstance(indexer, DeepseekV4Indexer) or not isinstance(indexer.scorer, DeepseekV4IndexerScorer):
                raise TypeError(
                    f"layer {layer} has no stock DeepseekV4Indexer: dump labels from an unpatched DeepSeek-V4"
                )
            self._handles.append(indexer.scorer.register_forward_hook(self._scores_hook(layer)))
            self._handles.append(indexer.register_forward_hook(self._indexer_hook(layer)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def take(self) -> ForwardCapture:
        taken, self._current = self._current, ForwardCapture()
        return taken

    def _hidden_hook(self, layer: int):
        def hook(module, args, kwargs):
            hidden_states = args[0] if args else kwargs["hidden_states"]  # (documents, chunk tokens, hidden)
            positions = kwargs["position_ids"][0].cpu()
            kept = [torch.isin(positions, triggers).nonzero().flatten() for triggers in self.triggers]
            document = torch.cat([torch.full_like(rows, index) for index, rows in enumerate(kept)])
            states = hidden_states[document.to(hidden_states.device), torch.cat(kept).to(hidden_states.device)]
            self._current.hidden[layer] = list(states.detach().cpu().split([rows.numel() for rows in kept]))

        return hook

    def _scores_hook(self, layer: int):
        def hook(module, args, output):
            self._scores[layer] = output  # (1, chunk tokens, chunks), consumed by the indexer hook

        return hook

    def _indexer_hook(self, layer: int):
        def hook(module, args, output):
            positions = args[2][0]  # (chunk tokens,), the same for every document
            scores = self._scores.pop(layer)  # (documents, chunk tokens, chunks)
            documents, tokens, chunks = scores.shape
            flat = nucleus_top_k(
                scores.reshape(documents * tokens, chunks), positions.repeat(documents), self.top_k,
                self.compress_rate, self.nucleus,
            )
            indices, keep = (tensor.reshape(documents, tokens, -1).cpu() for tensor in flat)
            self._current.nucleus_sets[layer] = (indices, keep)
            self._current.used[layer] = output.detach().cpu()
            self._current.positions = positions.cpu()

        return hook
