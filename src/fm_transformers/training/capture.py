"""Hooks that read what the label dump needs out of a stock DeepSeek-V4 forward, without changing it.

Per forward call (one chunk of a document) they collect:
- the hidden state entering each target layer's attention (after input_layernorm), at the trigger positions only;
- for every CSA layer, the native indexer's nucleus over its top-k (from `DeepseekV4IndexerScorer`'s scores,
  which come before the causal mask) and the top-k it actually handed to the attention (`DeepseekV4Indexer`'s
  output). The (chunk tokens x history) score matrix is reduced to (chunk tokens x k) inside the hook and
  dropped, so the dump never holds more than the backbone itself materializes for one chunk.
This module is the one place of the training side that knows the transformers module layout.
"""

import torch
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4Indexer, DeepseekV4IndexerScorer

from .labels import nucleus_top_k

CSA_LAYER_TYPE = "compressed_sparse_attention"


def csa_layers(config) -> list[int]:
    return [i for i, kind in enumerate(config.layer_types) if kind == CSA_LAYER_TYPE]


class IndexerCapture:
    """Context manager: registers the hooks on enter, removes them on exit (even on error).

    After each forward, `take()` returns and clears what that forward produced. `triggers` (1-D positions)
    selects which hidden states are kept; set it before the forward.
    """

    def __init__(self, model, target_layers: list[int], nucleus: float):
        config = model.config
        self.layers = model.model.layers
        self.csa_layers = csa_layers(config)
        self.target_layers = list(target_layers)
        self.top_k = config.index_topk
        self.compress_rate = config.compress_rates[CSA_LAYER_TYPE]
        self.nucleus = nucleus
        self.triggers = torch.zeros(0, dtype=torch.long)
        self._handles = []
        self._scores: dict[int, torch.Tensor] = {}
        self._reset()

    def _reset(self) -> None:
        self.hidden: dict[int, torch.Tensor] = {}  # layer -> (triggers in chunk, hidden)
        self.trigger_positions = torch.zeros(0, dtype=torch.long)
        self.positions = torch.zeros(0, dtype=torch.long)  # (chunk tokens,)
        self.nucleus_sets: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (indices, keep)
        self.used: dict[int, torch.Tensor] = {}  # layer -> (chunk tokens, k) with -1 for empty slots

    def __enter__(self) -> "IndexerCapture":
        for layer in self.target_layers:
            attention = self.layers[layer].self_attn
            self._handles.append(attention.register_forward_pre_hook(self._hidden_hook(layer), with_kwargs=True))
        for layer in self.csa_layers:
            indexer = self.layers[layer].self_attn.compressor.indexer
            if not isinstance(indexer, DeepseekV4Indexer) or not isinstance(indexer.scorer, DeepseekV4IndexerScorer):
                raise TypeError(
                    f"layer {layer} has no stock DeepseekV4Indexer: dump labels from an unpatched DeepSeek-V4 "
                    f"(call fm_transformers' remove patch first if it is applied)"
                )
            self._handles.append(indexer.scorer.register_forward_hook(self._scores_hook(layer)))
            self._handles.append(indexer.register_forward_hook(self._indexer_hook(layer)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def take(self) -> "IndexerCapture":
        """A snapshot of this forward's captures; the live object starts empty for the next forward."""
        snapshot = object.__new__(IndexerCapture)
        snapshot.__dict__.update(
            hidden=self.hidden,
            trigger_positions=self.trigger_positions,
            positions=self.positions,
            nucleus_sets=self.nucleus_sets,
            used=self.used,
        )
        self._reset()
        return snapshot

    def _hidden_hook(self, layer: int):
        def hook(module, args, kwargs):
            hidden_states = args[0] if args else kwargs["hidden_states"]  # (1, chunk tokens, hidden)
            positions = kwargs["position_ids"][0].cpu()
            rows = torch.isin(positions, self.triggers).nonzero().flatten()
            self.hidden[layer] = hidden_states[0, rows.to(hidden_states.device)].detach().cpu()
            self.trigger_positions = positions[rows]

        return hook

    def _scores_hook(self, layer: int):
        def hook(module, args, output):
            self._scores[layer] = output  # (1, chunk tokens, chunks), consumed by the indexer hook

        return hook

    def _indexer_hook(self, layer: int):
        def hook(module, args, output):
            positions = args[2][0]  # (chunk tokens,)
            scores = self._scores.pop(layer)[0]
            indices, keep = nucleus_top_k(scores, positions, self.top_k, self.compress_rate, self.nucleus)
            self.nucleus_sets[layer] = (indices.cpu(), keep.cpu())
            self.used[layer] = output[0].detach().cpu()
            self.positions = positions.cpu()

        return hook
