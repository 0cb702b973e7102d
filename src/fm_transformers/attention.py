"""The attention of a CSA layer under LSA.

Prefill runs the stock forward (the full compressed history on the device, see LookaheadCSALayer). A decode
step runs the stock projections, RoPE and output projections around a sparse core: it compresses the new
token exactly as the stock compressor does, runs level 2 over the resident candidates only (the native
indexer's scores and its top-k), and attends the sliding window, those picks and the sink with the
kernels' sparse decode attention, reading the picks in place in the hot set. Around both, the cache's
level-1 schedule observes the target layers and triggers recalls.
"""

import torch
from transformers.models.deepseek_v4.modeling_deepseek_v4 import apply_rotary_pos_emb

from .cache import INDEX_KEYS, KV, LookaheadCSALayer
from .kernels.level2_topk import level2_topk
from .kernels.sparse_decode_attention import sparse_decode_attention


def lookahead_attention_forward(attention, stock_forward, hidden_states, position_embeddings, position_ids, attention_mask, cache, **kwargs):
    """Drop-in for DeepseekV4Attention.forward of a CSA layer when the cache is an OffloadedLookaheadCache.

    Returns (output (batch, seq, hidden), attention weights or None) like the stock forward.
    """
    batch, seq_len, _ = hidden_states.shape
    layer = cache.begin_csa_layer(attention.layer_idx, seq_len)
    if layer.prefilling:
        output = stock_forward(attention, hidden_states, position_embeddings, position_ids, attention_mask, cache, **kwargs)
    else:
        output = sparse_decode_forward(attention, layer, hidden_states, position_embeddings, position_ids, attention_mask, cache)
    cache.end_csa_layer(attention.layer_idx, hidden_states[:, -1], position_ids.expand(batch, -1)[:, -1])
    return output


def sparse_decode_forward(attention, layer: LookaheadCSALayer, hidden_states, position_embeddings, position_ids, attention_mask, cache):
    """The stock DeepseekV4Attention.forward for one decode token, with the window + all-entries eager
    attention replaced by sparse decode attention over the window, the level-2 picks and the sink."""
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, attention.head_dim)
    cos, sin = position_embeddings[attention.rope_layer_type]
    q_residual = attention.q_a_norm(attention.q_a_proj(hidden_states))
    q = attention.q_b_proj(q_residual).view(*hidden_shape).transpose(1, 2)
    q = apply_rotary_pos_emb(attention.q_b_norm(q), cos, sin)  # (batch, heads, 1, head_dim)
    kv = attention.kv_norm(attention.kv_proj(hidden_states)).view(*hidden_shape).transpose(1, 2)
    kv = apply_rotary_pos_emb(kv, cos, sin)
    window = cache.update(kv, kv, attention.layer_idx)[0][:, 0]  # (batch, window, head_dim)
    refresh = None
    if attention.layer_idx in cache.refresh_layers:
        refresh = lambda picks: cache.refresh_on_miss(attention.layer_idx, picks)  # noqa: E731
    table, picked = level2_picks(
        attention.compressor, layer, hidden_states, q_residual, position_ids.expand(input_shape[0], -1), refresh
    )
    bias = window_bias(attention_mask, window)
    out = sparse_decode_attention(q[:, :, 0], window, bias, table, picked, attention.sinks, attention.scaling)
    # K = V carries RoPE on its rope slice: undo it at the query position, as the stock forward does.
    out = apply_rotary_pos_emb(out.unsqueeze(2), cos, -sin).transpose(1, 2)  # (batch, 1, heads, head_dim)
    grouped = attention.o_a_proj(out.reshape(*input_shape, attention.config.o_groups, -1)).flatten(2)
    return attention.o_b_proj(grouped), None


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


def level2_picks(compressor, layer: LookaheadCSALayer, hidden_states, q_residual, position_ids, refresh=None):
    """Store the new token's compressed entries, then pick the native top-k among the resident candidates.

    `refresh`, given at the config's refresh layers, first receives the native top-k over the
    whole history (chunk ids, (batch, k)) and may change the resident set before the candidates are read.
    Returns (the layer's KV slot table (rows, head_dim), picked rows (batch, k)), -1 where fewer than k
    candidates are causally visible.
    """
    layer.update_compressor_states(KV, compress_new_entries(compressor, layer, hidden_states, KV))
    indexer = compressor.indexer
    layer.update_compressor_states(INDEX_KEYS, compress_new_entries(indexer, layer, hidden_states, INDEX_KEYS))
    q, weights = native_index_query(indexer, hidden_states, q_residual, position_ids)
    visible_chunks = (position_ids + 1) // compressor.compress_rate  # (batch, 1)
    if refresh is not None:
        refresh(whole_history_topk(layer, q, weights, visible_chunks, indexer))

    slot_index, chunk_ids = layer.hot.candidates()  # (batch, candidates), -1 padded
    key_table, key_slots = layer.candidate_index_key_slots(slot_index, chunk_ids)
    visible = (chunk_ids >= 0) & (chunk_ids < visible_chunks)  # (batch, candidates)
    top_pos, _ = level2_topk(q, weights, key_table, key_slots, visible, indexer.index_topk, indexer.scorer.softmax_scale)
    picked = slot_index.gather(1, top_pos.clamp(min=0)).masked_fill(top_pos < 0, -1)  # (batch, k)
    return layer.hot.table(KV), picked


def whole_history_topk(layer: LookaheadCSALayer, q, weights, visible_chunks, indexer) -> torch.Tensor:
    """The stock native top-k of a layer whose indexer keys are all on the device: chunk ids (batch, k),
    best first, -1 where fewer than k chunks are visible."""
    batch, chunks, dim = layer.index_keys.shape
    chunk_ids = torch.arange(chunks, device=q.device).expand(batch, -1)
    slots = torch.arange(batch, device=q.device).unsqueeze(1) * chunks + chunk_ids
    keys = layer.index_keys.reshape(batch * chunks, dim)
    visible = chunk_ids < visible_chunks
    top, _ = level2_topk(q, weights, keys, slots, visible, indexer.index_topk, indexer.scorer.softmax_scale)
    return top


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
