"""The attention of DeepSeek-V4 layers under an LSA cache: the router and the CSA decode step.

A multi-token forward (a prompt, or a chunk of one) goes to the bounded prefill (prefill.py) in every layer
kind. A decode step of a CSA layer runs the stock projections, RoPE and output projections around a sparse
core: it compresses the new token exactly as the stock compressor does, runs level 2 over the resident
candidates only (the native indexer's scores and its top-k), and attends the sliding window, those picks and
the sink with the kernels' sparse decode attention, reading the picks in place in the hot set. Sliding and
HCA layers decode the stock way (their cache is small). Around CSA layers, the cache's level-1 schedule
observes the target layers and triggers recalls.
"""

import torch

from .cache import INDEX_KEYS, KV, LookaheadCSALayer
from .kernels.level2_topk import level2_topk
from .kernels.sparse_decode_attention import sparse_decode_attention
from .layout import CSA_LAYER_TYPE
from .prefill import prefill_attention_forward
from .v4_parts import compress_new_entries, native_index_query, project_output, project_query_and_kv


def lsa_attention_forward(attention, stock_forward, hidden_states, position_embeddings, position_ids, attention_mask, cache, **kwargs):
    """Drop-in for DeepseekV4Attention.forward when the cache is an OffloadedLookaheadCache.

    Returns (output (batch, seq, hidden), None) like the stock forward (no attention weights).
    """
    batch, seq_len, _ = hidden_states.shape
    if attention.layer_idx == 0:
        cache.check_fits(attention.config.layer_types)
    if attention.layer_type != CSA_LAYER_TYPE:
        if seq_len > 1:
            return prefill_attention_forward(attention, hidden_states, position_embeddings, position_ids, attention_mask, cache)
        return stock_forward(attention, hidden_states, position_embeddings, position_ids, attention_mask, cache, **kwargs)
    layer = cache.begin_csa_layer(attention.layer_idx, seq_len)
    if seq_len > 1:
        output = prefill_attention_forward(attention, hidden_states, position_embeddings, position_ids, attention_mask, cache)
    else:
        output = sparse_decode_forward(attention, layer, hidden_states, position_embeddings, position_ids, attention_mask, cache)
    cache.end_csa_layer(attention.layer_idx, hidden_states[:, -1], position_ids.expand(batch, -1)[:, -1])
    return output


def sparse_decode_forward(attention, layer: LookaheadCSALayer, hidden_states, position_embeddings, position_ids, attention_mask, cache):
    """The stock DeepseekV4Attention.forward for one decode token, with the window + all-entries eager
    attention replaced by sparse decode attention over the window, the level-2 picks and the sink."""
    batch = hidden_states.shape[0]
    cos, sin = position_embeddings[attention.rope_layer_type]
    q, kv, q_residual = project_query_and_kv(attention, hidden_states, cos, sin)  # q (batch, heads, 1, head_dim)
    window = cache.update(kv, kv, attention.layer_idx)[0][:, 0]  # (batch, window, head_dim)
    compressor, positions = attention.compressor, position_ids.expand(batch, -1)
    layer.store_entries(KV, compress_new_entries(compressor, layer, hidden_states, KV))
    layer.store_entries(INDEX_KEYS, compress_new_entries(compressor.indexer, layer, hidden_states, INDEX_KEYS))
    index_q, weights = native_index_query(compressor.indexer, hidden_states, q_residual, positions)
    index_q, weights = index_q[:, 0], weights[:, 0]  # (batch, heads, index_head_dim), (batch, heads)
    visible_chunks = (positions + 1) // compressor.compress_rate  # (batch, 1)
    if attention.layer_idx in cache.refresh_layers:
        cache.refresh_on_miss(attention.layer_idx, whole_history_topk(layer, index_q, weights, visible_chunks, compressor.indexer))
    picked = level2_picks(layer, index_q, weights, visible_chunks, compressor.indexer)
    bias = window_bias(attention_mask, window)
    out = sparse_decode_attention(q[:, :, 0], window, bias, layer.kv_table(), picked, attention.sinks, attention.scaling)
    return project_output(attention, out.unsqueeze(1), cos, sin), None


def window_bias(attention_mask: torch.Tensor | None, window: torch.Tensor) -> torch.Tensor:
    """(batch, window) float32 additive bias over the window slots: the stock mask's row of the decode token
    (0 where visible; a very negative number or -inf where masked, e.g. left padding)."""
    batch, slots = window.shape[:2]
    if attention_mask is None:
        return torch.zeros(batch, slots, device=window.device)
    if attention_mask.shape[-1] != slots:
        raise ValueError(
            f"the attention mask covers {attention_mask.shape[-1]} key slots, the sliding window holds {slots}: "
            "LSA decode expects the sliding-window mask that DeepSeek-V4 builds for its cache"
        )
    row = attention_mask[:, 0, -1].expand(batch, -1)
    if row.dtype == torch.bool:
        return torch.zeros(row.shape, device=row.device).masked_fill(~row, float("-inf"))
    return row.float()


def level2_picks(layer: LookaheadCSALayer, q, weights, visible_chunks, indexer) -> torch.Tensor:
    """The native top-k among the resident candidates: rows of `layer.kv_table()` (batch, k), -1 where fewer
    than k candidates are causally visible."""
    slot_index, chunk_ids = layer.level2_candidates()  # (batch, candidates), -1 padded
    key_table, key_slots = layer.candidate_index_keys(slot_index, chunk_ids)
    visible = (chunk_ids >= 0) & (chunk_ids < visible_chunks)  # (batch, candidates)
    top_pos, _ = level2_topk(q, weights, key_table, key_slots, visible, indexer.index_topk, indexer.scorer.softmax_scale)
    return slot_index.gather(1, top_pos.clamp(min=0)).masked_fill(top_pos < 0, -1)  # (batch, k)


def whole_history_topk(layer: LookaheadCSALayer, q, weights, visible_chunks, indexer) -> torch.Tensor:
    """The stock native top-k of a layer whose indexer keys are all on the device: chunk ids (batch, k),
    best first, -1 where fewer than k chunks are visible."""
    batch, chunks = layer.all_index_keys().shape[:2]
    chunk_ids = torch.arange(chunks, device=q.device).expand(batch, -1)
    keys, slots = layer.candidate_index_keys(chunk_ids, chunk_ids)
    visible = chunk_ids < visible_chunks
    top, _ = level2_topk(q, weights, keys, slots, visible, indexer.index_topk, indexer.scorer.softmax_scale)
    return top
