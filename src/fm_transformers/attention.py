"""The CSA compressor forward under LSA.

Prefill runs the stock forward (the full compressed history on the device, see LookaheadCSALayer). A decode
step compresses the new token exactly as the stock compressor does, then runs level 2 over the resident
candidates only: the native indexer's scores, its top-k, and the gathered entries that the stock attention
then attends together with the sliding window and the sink. Around both, the cache's level-1 schedule
observes the target layers and triggers recalls.
"""

import torch
from transformers.models.deepseek_v4.modeling_deepseek_v4 import apply_rotary_pos_emb

from .cache import INDEX_KEYS, KV, LookaheadCSALayer
from .kernels.level2_topk import level2_topk


def lookahead_csa_forward(compressor, stock_forward, hidden_states, q_residual, position_ids, cache, layer_idx):
    """Drop-in for DeepseekV4CSACompressor.forward when the cache is an OffloadedLookaheadCache.

    Returns (compressed_kv (batch, 1, n, head_dim), block_bias (batch, 1, seq, n)) like the stock forward.
    """
    batch, seq_len, _ = hidden_states.shape
    position_ids = position_ids.expand(batch, -1)
    layer = cache.begin_csa_layer(layer_idx, seq_len)
    if layer.prefilling:
        output = stock_forward(compressor, hidden_states, q_residual, position_ids, cache, layer_idx)
    else:
        output = _decode_step(compressor, layer, hidden_states, q_residual, position_ids)
    cache.end_csa_layer(layer_idx, hidden_states[:, -1], position_ids[:, -1])
    return output


def _decode_step(compressor, layer: LookaheadCSALayer, hidden_states, q_residual, position_ids):
    layer.update_compressor_states(KV, compress_new_entries(compressor, layer, hidden_states, KV))
    indexer = compressor.indexer
    layer.update_compressor_states(INDEX_KEYS, compress_new_entries(indexer, layer, hidden_states, INDEX_KEYS))

    slot_index, chunk_ids = layer.hot.candidates()  # (batch, candidates), -1 padded
    key_table, key_slots = layer.candidate_index_key_slots(slot_index, chunk_ids)
    visible = (chunk_ids >= 0) & (chunk_ids < (position_ids + 1) // compressor.compress_rate)  # (batch, candidates)
    q, weights = native_index_query(indexer, hidden_states, q_residual, position_ids)
    top_pos, _ = level2_topk(q, weights, key_table, key_slots, visible, indexer.index_topk, indexer.scorer.softmax_scale)
    picked_slots = slot_index.gather(1, top_pos.clamp(min=0))  # (batch, k)
    entries = layer.candidate_entries(KV, picked_slots)  # (batch, k, head_dim)
    block_bias = torch.zeros(top_pos.shape, dtype=entries.dtype, device=entries.device).masked_fill(top_pos < 0, float("-inf"))
    return entries.unsqueeze(1), block_bias[:, None, None]  # (batch, 1, k, head_dim), (batch, 1, 1, k)


def native_index_query(indexer, hidden_states, q_residual, position_ids):
    """The stock Lightning Indexer's query of the current token: q (batch, heads, index_head_dim) with RoPE,
    and its head weights (batch, heads) in float32, scaled as the stock scorer scales them."""
    batch = hidden_states.shape[0]
    cos, sin = indexer.rotary_emb(hidden_states, position_ids=position_ids, layer_type=indexer.rope_layer_type)
    q = indexer.q_b_proj(q_residual).view(batch, 1, -1, indexer.head_dim).transpose(1, 2)
    q = apply_rotary_pos_emb(q, cos, sin)[:, :, 0]
    weights = indexer.scorer.weights_proj(hidden_states[:, 0]).float() * indexer.scorer.weights_scaling
    return q, weights


def compress_new_entries(module, layer: LookaheadCSALayer, hidden_states: torch.Tensor, kind: str) -> torch.Tensor:
    """The entries that the stock CSA compressor (or its indexer) emits for these tokens: (batch, n, dim).

    Same operations in the same order as the stock forward (two overlapping series Ca/Cb, softmax gate,
    RMSNorm, RoPE at the window position), so entries are bit-identical; the buffer and overlap state
    live in the layer through the stock methods.
    """
    batch = hidden_states.shape[0]
    ratio, head_dim = module.compress_rate, module.head_dim
    kv, gate = module.kv_proj(hidden_states), module.gate_proj(hidden_states)
    chunk_kv, chunk_gate, first_position = layer.store_compression_weights(kind, kv, gate)
    if chunk_kv.shape[1] == 0:
        return chunk_kv.new_zeros((batch, 0, head_dim))
    windows = chunk_kv.shape[1] // ratio
    chunk_kv = chunk_kv.view(batch, windows, ratio, -1)
    chunk_gate = chunk_gate.view(batch, windows, ratio, -1) + module.position_bias
    series_kv = chunk_kv.new_zeros((batch, windows, 2 * ratio, head_dim))
    series_gate = chunk_gate.new_full((batch, windows, 2 * ratio, head_dim), float("-inf"))
    series_kv[:, :, ratio:] = chunk_kv[..., head_dim:]
    series_gate[:, :, ratio:] = chunk_gate[..., head_dim:]
    if windows > 1:
        series_kv[:, 1:, :ratio] = chunk_kv[:, :-1, :, :head_dim]
        series_gate[:, 1:, :ratio] = chunk_gate[:, :-1, :, :head_dim]
    prior_kv, prior_gate = layer.update_overlap_state(kind, chunk_kv, chunk_gate, head_dim)
    if prior_kv is not None:
        series_kv[:, 0, :ratio] = prior_kv.to(series_kv.dtype)
        series_gate[:, 0, :ratio] = prior_gate.to(series_gate.dtype)
    weights = series_gate.softmax(dim=2, dtype=torch.float32).to(series_kv.dtype)
    compressed = module.kv_norm((series_kv * weights).sum(dim=2))
    positions = (torch.arange(windows, device=compressed.device) * ratio + first_position).unsqueeze(0).expand(batch, -1)
    cos, sin = module.rotary_emb(compressed, position_ids=positions, layer_type=module.rope_layer_type)
    return apply_rotary_pos_emb(compressed.unsqueeze(1), cos, sin).squeeze(1)
