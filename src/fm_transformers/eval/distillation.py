"""Training signal for the native Lightning Indexer: distillation from the main attention, as DeepSeek does.

The indexer's only output is a top-k of entry ids, so the language-model loss sends it no gradient. Instead, in
every CSA layer, the indexer's softmax over the compressed entries is pulled (KL divergence) toward the main
attention's probability mass on those entries, summed over heads and renormalized over the entries that the
attention could see (all causal entries while CSA is dense, the indexer's own top-k afterwards).

Invariant: the indexer's inputs are detached inside the forward, and the target is detached, so this loss trains
the indexer's parameters only, while the language-model loss trains everything but the indexer.
The hooks read stock transformers tensors: the scorer's output (before the causal mask), the indexer's top-k,
and the attention weights that `eager_attention_forward` returns, whose last columns are the compressed entries
(the key axis is the sliding-window keys, then the compressed entries).
"""

import sys

import torch
from transformers.models.deepseek_v4.modeling_deepseek_v4 import (
    DeepseekV4Attention,
    DeepseekV4Indexer,
    DeepseekV4IndexerScorer,
)

from ..layout import csa_layers


def _indexers(model) -> list[DeepseekV4Indexer]:
    return [model.model.layers[i].self_attn.compressor.indexer for i in csa_layers(model.config)]


def indexer_parameter_names(model) -> set[str]:
    """Names (as in `model.named_parameters()`) of every Lightning Indexer parameter."""
    indexers = {id(module) for module in _indexers(model)}
    names = set()
    for module_name, module in model.named_modules():
        if id(module) in indexers:
            names.update(f"{module_name}.{name}" for name, _ in module.named_parameters())
    return names


def set_dense_csa(model, dense: bool) -> None:
    """Dense: every indexer keeps all compressed entries, so the CSA branch attends the whole compressed history
    (the warm-up, which gives the indexer a full attention distribution to learn from). Not dense: the
    config's `index_topk`, the model as it is served."""
    top_k = sys.maxsize if dense else model.config.index_topk
    for indexer in _indexers(model):
        indexer.index_topk = top_k


def indexer_kl(scores: torch.Tensor, attention_mass: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(attention || softmax(indexer scores)), both restricted to the selected entries.

    scores: (rows, entries) raw indexer scores; attention_mass: (rows, entries), non-negative, no gradient;
    selected: (rows, entries) bool, the entries the attention could see. Rows with no attention mass on any
    selected entry (queries too early to see an entry) have no target and are left out of the mean.
    Written without boolean indexing, which would make the GPU wait for the host.
    """
    tiny = torch.finfo(torch.float32).tiny
    target = attention_mass.float().masked_fill(~selected, 0.0)
    total = target.sum(dim=-1, keepdim=True)
    usable = (total > 0).squeeze(-1)
    target = target / total.clamp_min(tiny)
    log_q = scores.float().masked_fill(~selected, torch.finfo(torch.float32).min).log_softmax(dim=-1)
    terms = torch.where(selected, target * (target.clamp_min(tiny).log() - log_q), 0.0)
    return (terms.sum(dim=-1) * usable).sum() / usable.sum().clamp_min(1)


class IndexerDistillation:
    """Context manager: hooks every CSA layer on enter, removes the hooks on exit (even on error).

    Set `rows` (flat indices into batch * seq, or None for every position) before a forward to choose the
    query positions to distill; `loss()` then returns the KL summed over CSA layers and clears what the forward
    captured. What is kept per layer is reduced to those rows inside the hooks.

    The hooks are the same three callables on every CSA layer and what they capture is appended in the order the
    layers run (each layer's scorer, then its selection, then its attention): a hook that named its layer would be
    a different function per layer, and torch.compile would then compile each CSA layer apart, past its
    recompile limit, leaving the deep layers eager.
    """

    def __init__(self, model):
        self.model = model
        self.layers = csa_layers(model.config)
        if not self.layers:
            raise ValueError("the model has no compressed_sparse_attention layer: there is no indexer to distill")
        self.rows: torch.Tensor | None = None
        self._handles = []
        self._scores: list[torch.Tensor] = []
        self._selected: list[torch.Tensor] = []
        self._mass: list[torch.Tensor] = []

    def __enter__(self) -> "IndexerDistillation":
        on_scores, on_selection, on_attention = self._on_scores, self._on_selection, self._on_attention
        for index in self.layers:
            attention = self.model.model.layers[index].self_attn
            indexer = attention.compressor.indexer
            if not isinstance(attention, DeepseekV4Attention) or not isinstance(indexer, DeepseekV4Indexer):
                raise TypeError(f"layer {index} is not a stock DeepSeek-V4 CSA layer: distill an unpatched model")
            if not isinstance(indexer.scorer, DeepseekV4IndexerScorer):
                raise TypeError(f"layer {index} has no stock DeepseekV4IndexerScorer: distill an unpatched model")
            self._handles += [
                indexer.register_forward_pre_hook(_detach_indexer_inputs),
                indexer.scorer.register_forward_hook(on_scores),
                indexer.register_forward_hook(on_selection),
                attention.register_forward_hook(on_attention),
            ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._clear()

    def _clear(self) -> None:
        self._scores.clear()
        self._selected.clear()
        self._mass.clear()

    def _take_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """(batch, seq, ...) -> (rows, ...)."""
        flat = tensor.flatten(0, 1)
        return flat if self.rows is None else flat.index_select(0, self.rows.to(tensor.device))

    def _on_scores(self, module, args, scores):  # scores: (batch, seq, entries)
        self._scores.append(self._take_rows(scores))

    def _on_selection(self, module, args, top_k):  # top_k: (batch, seq, k), -1 where no causal entry is left
        entries = self._scores[-1].shape[-1]
        slots = torch.where(top_k >= 0, top_k, entries)
        selected = torch.zeros(*top_k.shape[:2], entries + 1, dtype=torch.bool, device=top_k.device)
        self._selected.append(self._take_rows(selected.scatter_(-1, slots, True)[..., :entries]))

    def _on_attention(self, module, args, output):
        weights = output[1]  # (batch, heads, seq, window keys + entries)
        if weights is None:
            raise RuntimeError("attention weights are missing: distillation needs the eager attention")
        entries = self._scores[-1].shape[-1]
        mass = weights[..., weights.shape[-1] - entries :].detach().float().sum(dim=1)
        self._mass.append(self._take_rows(mass))

    def loss(self) -> torch.Tensor:
        """KL summed over CSA layers (each layer's indexer learns its own layer's attention)."""
        captured = (len(self._scores), len(self._selected), len(self._mass))
        if captured != (len(self.layers),) * 3:
            self._clear()
            raise RuntimeError(
                f"captured {captured} (scores, selections, attentions) for {len(self.layers)} CSA layers: run one "
                "forward inside the context before each loss()"
            )
        total = sum(indexer_kl(*layer) for layer in zip(self._scores, self._mass, self._selected, strict=True))
        self._clear()
        return total


def _detach_indexer_inputs(module, args):
    """The indexer is called as indexer(hidden_states, q_residual, position_ids, cache, layer_idx): cutting the
    graph at its two tensor inputs keeps the KL from reaching the main model."""
    hidden_states, q_residual, *rest = args
    return (hidden_states.detach(), q_residual.detach(), *rest)
