"""Bounded prefill: a long prompt through every DeepSeek-V4 layer kind without a (chunk x history) tensor.

The stock forward of a prompt chunk scores every query against every compressed entry (`[B, S, H, T]`),
builds a dense `[B, 1, S, T]` block bias and runs eager attention over the window, the chunk and all
compressed entries with fp32 softmax copies. Here, with the same projections, compressors and RoPE
(v4_parts.py), each query attends only what the stock mask lets it see:

- sliding layers: its band of `sliding_window` tokens;
- HCA layers: its band, and the compressed entries made before it (a prefix of the layer's history);
- CSA layers: its band, and the native indexer's top-k over the history, picked by `indexer_topk`, which
  streams over blocks of keys with a running top-k (ties between exactly equal scores may pick otherwise
  than the stock `topk` over the whole row).

The attention core is `sparse_prefill_attention` (a Triton kernel on the GPU, a blocked torch reference on
the CPU) with the per-head sink. A CSA layer of an LSA cache holds its whole history on the device during a
prefill and reads it in place; every entry also goes to the cold pool as it is made.
"""

import torch
import torch.nn.functional as F

from .cache import INDEX_KEYS, KV, LookaheadCSALayer
from .kernels.indexer_topk import indexer_topk
from .kernels.sparse_prefill_attention import sparse_prefill_attention, window_band
from .layout import CSA_LAYER_TYPE, HCA_LAYER_TYPE
from .v4_parts import compress_new_entries, native_index_query, project_output, project_query_and_kv


def prefill_attention_forward(attention, hidden_states, position_embeddings, position_ids, attention_mask, cache):
    """DeepseekV4Attention.forward for a multi-token chunk, bounded. Returns (output (batch, seq, hidden), None)."""
    batch, seq_len, _ = hidden_states.shape
    cos, sin = position_embeddings[attention.rope_layer_type]
    q, kv, q_residual = project_query_and_kv(attention, hidden_states, cos, sin)  # (B, H, S, D), (B, 1, S, D)
    full = cache.update(kv, kv, attention.layer_idx)[0][:, 0]  # (B, prior window + S, D)
    positions = position_ids.expand(batch, -1)
    comp = _compressed_sources(attention, cache.layers[attention.layer_idx], hidden_states, q_residual, positions)
    heads, head_dim = q.shape[1], q.shape[-1]
    out = q.new_empty(batch, seq_len, heads, head_dim)
    for row in range(batch):
        band, bias = window_rows(full[row], _mask_rows(attention_mask, row), attention.sliding_window, seq_len)
        table, picks, limit = comp(row)
        out[row] = sparse_prefill_attention(
            q[row].transpose(0, 1), band, bias, table, attention.sinks, attention.scaling, comp_idx=picks, comp_limit=limit
        )
    return project_output(attention, out, cos, sin), None


def _compressed_sources(attention, layer, hidden_states, q_residual, positions):
    """Store this chunk's compressed entries and return `row -> (table (T, D), picks (S, k) or None,
    limit (S,) or None)`: what each query of sequence `row` attends besides its band (sliding layers: an
    empty prefix)."""
    if attention.layer_type == HCA_LAYER_TYPE:
        compressor = attention.compressor
        history = layer.update_compressor_states(KV, compress_new_entries(compressor, layer, hidden_states, KV, overlap=False))
        limit = ((positions + 1) // compressor.compress_rate).clamp(max=history.shape[1])
        return lambda row: (history[row], None, limit[row])
    if attention.layer_type != CSA_LAYER_TYPE:
        nothing = hidden_states.new_empty(0, attention.head_dim)
        return lambda row: (nothing, None, torch.zeros_like(positions[row]))
    compressor = attention.compressor
    indexer = compressor.indexer
    kv_history = _store(layer, KV, compress_new_entries(compressor, layer, hidden_states, KV))
    key_history = _store(layer, INDEX_KEYS, compress_new_entries(indexer, layer, hidden_states, INDEX_KEYS))
    index_q, weights = native_index_query(indexer, hidden_states, q_residual, positions)  # (B, S, Hi, Dk), (B, S, Hi)
    limit = ((positions + 1) // compressor.compress_rate).clamp(max=kv_history.shape[0])

    def picked(row):
        picks, _ = indexer_topk(
            index_q[row], weights[row], key_history[:, row], limit[row], indexer.index_topk, indexer.scorer.softmax_scale
        )
        return kv_history[:, row], picks, None

    return picked


def _store(layer, kind: str, entries: torch.Tensor) -> torch.Tensor:
    """Store new entries in a CSA cache layer; return every entry of `kind` on the device, (chunks, batch, dim).
    An LSA layer keeps them in its hot set (and the cold pool); a stock layer in its growing tensor."""
    if isinstance(layer, LookaheadCSALayer):
        layer.store_entries(kind, entries)
        return layer.history(kind)
    return layer.update_compressor_states(kind, entries).transpose(0, 1)


def _mask_rows(attention_mask: torch.Tensor | None, row: int) -> torch.Tensor | None:
    """(S, keys) rows of the stock 4-D mask for one sequence, or None."""
    if attention_mask is None:
        return None
    return attention_mask[row if attention_mask.shape[0] > 1 else 0, 0]


def window_rows(full: torch.Tensor, mask: torch.Tensor | None, window: int, seq_len: int):
    """Each query's sliding-window band of one sequence: (band (S, W, D), a zero-copy view when no padding
    is needed, and its fp32 additive bias (S, W)).

    `full` (prior + S, D) is what the stock window cache returns: up to W - 1 earlier tokens then the chunk;
    query i sits at row prior + i and sees rows prior + i - W + 1 .. prior + i, as far as the stock mask
    `mask` (S, prior + S) allows. Missing earlier rows (a first chunk) are zero rows at -inf.
    """
    prior = full.shape[0] - seq_len  # at most W - 1: the stock window cache keeps no more
    if mask is not None and mask.shape[-1] != full.shape[0]:
        raise ValueError(
            f"the attention mask covers {mask.shape[-1]} key slots, the window cache returned {full.shape[0]}: "
            "LSA prefill expects the sliding-window mask that DeepSeek-V4 builds for its cache"
        )
    missing = window - 1 - prior
    band = window_band(F.pad(full, (0, 0, missing, 0)), window)  # over (W - 1 + S, D)
    columns = torch.arange(seq_len, device=full.device)[:, None] + torch.arange(window, device=full.device)[None, :]
    columns = columns - missing  # (S, W): column of `full` and of the mask; < 0 is padding
    if mask is None:
        bias = torch.zeros(columns.shape, device=full.device)
    elif mask.dtype == torch.bool:
        bias = torch.zeros(columns.shape, device=full.device).masked_fill(~mask.gather(1, columns.clamp(min=0)), float("-inf"))
    else:
        bias = mask.gather(1, columns.clamp(min=0)).float()
    return band, bias.masked_fill(columns < 0, float("-inf"))
