"""The stock DeepSeek-V4 attention's pieces, step for step, for the LSA prefill and decode to reuse.

Same operations in the same order as transformers' `DeepseekV4Attention.forward`, its compressors and its
Lightning Indexer, so what LSA computes around its own attention core is bit-identical to the stock model.
"""

import torch
from transformers.models.deepseek_v4.modeling_deepseek_v4 import apply_rotary_pos_emb


def project_query_and_kv(attention, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q (batch, heads, seq, head_dim) and the shared K=V (batch, 1, seq, head_dim), both with RoPE, and the
    query's low-rank residual (batch, seq, q_lora_rank) that the indexer reads too."""
    hidden_shape = (*hidden_states.shape[:-1], -1, attention.head_dim)
    q_residual = attention.q_a_norm(attention.q_a_proj(hidden_states))
    q = attention.q_b_proj(q_residual).view(*hidden_shape).transpose(1, 2)
    q = apply_rotary_pos_emb(attention.q_b_norm(q), cos, sin)
    kv = attention.kv_norm(attention.kv_proj(hidden_states)).view(*hidden_shape).transpose(1, 2)
    return q, apply_rotary_pos_emb(kv, cos, sin), q_residual


def project_output(attention, out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """out (batch, seq, heads, head_dim) of the attention core -> the layer's output (batch, seq, hidden).
    K = V carries RoPE on its rope slice: undo it at the query position, as the stock forward does."""
    batch, seq_len = out.shape[:2]
    out = apply_rotary_pos_emb(out.transpose(1, 2), cos, -sin).transpose(1, 2)  # RoPE wants (batch, heads, seq, dim)
    grouped = attention.o_a_proj(out.reshape(batch, seq_len, attention.config.o_groups, -1)).flatten(2)
    return attention.o_b_proj(grouped)


def native_index_query(indexer, hidden_states, q_residual, position_ids):
    """The stock Lightning Indexer's queries: q (batch, seq, heads, index_head_dim) with RoPE, and the head
    weights (batch, seq, heads) in float32, scaled as the stock scorer scales them."""
    batch, seq_len = hidden_states.shape[:2]
    cos, sin = indexer.rotary_emb(hidden_states, position_ids=position_ids, layer_type=indexer.rope_layer_type)
    q = indexer.q_b_proj(q_residual).view(batch, seq_len, -1, indexer.head_dim).transpose(1, 2)
    q = apply_rotary_pos_emb(q, cos, sin).transpose(1, 2)
    weights = indexer.scorer.weights_proj(hidden_states).float() * indexer.scorer.weights_scaling
    return q, weights


def compress_new_entries(module, layer, hidden_states: torch.Tensor, kind: str, overlap: bool = True) -> torch.Tensor:
    """The entries that a stock compressor emits for these tokens: (batch, n, dim).

    `module` is a CSA compressor, its indexer (overlap=True: two overlapping series Ca/Cb) or an HCA compressor
    (overlap=False: one series). Softmax gate, RMSNorm, RoPE at the window position as the stock forward does,
    so entries are bit-identical; the buffer and overlap state live in the cache `layer` through its stock
    methods.
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
    if overlap:
        chunk_kv, chunk_gate = _overlapping_series(layer, kind, chunk_kv, chunk_gate, ratio, head_dim)
    weights = chunk_gate.softmax(dim=2, dtype=torch.float32).to(chunk_kv.dtype)
    compressed = module.kv_norm((chunk_kv * weights).sum(dim=2))
    positions = (torch.arange(windows, device=compressed.device) * ratio + first_position).unsqueeze(0).expand(batch, -1)
    cos, sin = module.rotary_emb(compressed, position_ids=positions, layer_type=module.rope_layer_type)
    return apply_rotary_pos_emb(compressed.unsqueeze(1), cos, sin).squeeze(1)


def _overlapping_series(layer, kind, chunk_kv, chunk_gate, ratio, head_dim):
    """CSA's width-2m windows: window w = Ca of window w-1 (its first half) then Cb of window w; window 0's
    first half comes from the previous forward (the layer's overlap state), or weighs 0 on the first one."""
    batch, windows = chunk_kv.shape[:2]
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
    return series_kv, series_gate
