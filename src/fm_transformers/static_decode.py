"""One decode step of DeepSeek-V4 with every shape fixed and no host sync, so a CUDA graph can capture it.

The stock cache layers grow by concatenation and decide in Python when a compressor window closes; here each
layer's state lives in fixed device buffers written in place:

- the sliding window is a ring of `sliding_window` slots (token t in slot t % window) with a bias row that
  masks empty slots and padding;
- a compressor keeps its window in progress in a fixed buffer and computes that window's entry at every step,
  masked until the window is complete (then it is the stock entry); CSA's overlap (the previous window's
  first half) is kept the same way and advanced on the device when a window closes;
- HCA entries sit in a buffer of fixed capacity, attended up to the count made so far;
- CSA layers read and write the LSA hot set in place (`LookaheadCSALayer.fix_capacity`): resident chunks
  then the tail, candidates in a fixed table whose resident part a recall rewrites between steps.

Two device tensors place the step: `StaticDecodeState.token`, the index t of the new token in the cache (the
same for every sequence: window slots and compressor windows follow it, as the stock cache's counts do), and
`position` (batch, 1), the model's position ids (RoPE, causal visibility). The host counts the same tokens
(decode_graph.py) to do, between steps, what needs the host: level 1, recalls, the pool's copies.
"""

import torch
from transformers.models.deepseek_v4.modeling_deepseek_v4 import apply_rotary_pos_emb

from .cache import INDEX_KEYS, KV, LookaheadCSALayer
from .kernels.level2_topk import level2_topk
from .kernels.sparse_decode_attention import sparse_decode_attention
from .layout import CSA_LAYER_TYPE, HCA_LAYER_TYPE
from .v4_parts import native_index_query, project_output, project_query_and_kv

NEG_INF = float("-inf")


class StaticWindow:
    """The sliding window as a ring: kv (batch, window, head_dim), bias (batch, window) fp32 (0 visible,
    -inf empty or padding)."""

    def __init__(self, keys: torch.Tensor | None, padding_mask: torch.Tensor | None, tokens: int, window: int, dims):
        batch, head_dim, device, dtype = dims
        self.window = window
        self.kv = torch.zeros(batch, window, head_dim, device=device, dtype=dtype)
        self.bias = torch.full((batch, window), NEG_INF, device=device)
        if keys is not None and keys.shape[2]:
            held = keys.shape[2]  # the last `held` tokens: tokens - held .. tokens - 1
            slots = torch.arange(tokens - held, tokens, device=device) % window
            self.kv[:, slots] = keys[:, 0].to(dtype)
            visible = torch.ones(batch, held, dtype=torch.bool, device=device)
            if padding_mask is not None:
                visible = padding_mask[:, tokens - held : tokens].to(device=device, dtype=torch.bool)
            self.bias[:, slots] = torch.zeros(batch, held, device=device).masked_fill(~visible, NEG_INF)

    def write(self, kv: torch.Tensor, slot: torch.Tensor, valid: torch.Tensor) -> None:
        """kv (batch, head_dim) of the new token into `slot` (1,) long; valid (batch,) bool."""
        self.kv.index_copy_(1, slot, kv.unsqueeze(1))
        self.bias.index_copy_(1, slot, torch.zeros_like(valid, dtype=torch.float32).masked_fill(~valid, NEG_INF).unsqueeze(1))

    def stock_keys(self, tokens: int) -> torch.Tensor:
        """(batch, 1, held, head_dim): the last min(tokens, window - 1) tokens in order, as the stock layer holds them."""
        held = min(tokens, self.window - 1)
        slots = torch.arange(tokens - held, tokens, device=self.kv.device) % self.window
        return self.kv[:, slots].unsqueeze(1).clone()


class StaticCompressor:
    """A compressor's window in progress (and CSA's overlap) in fixed buffers; `entry` returns the entry of the
    window holding the current token, equal to the stock one once that window is complete."""

    def __init__(self, module, layer, kind: str, overlap: bool, tokens: int):
        self.module, self.kind, self.overlap = module, kind, overlap
        ratio, head_dim = module.compress_rate, module.head_dim
        buffered = layer.buffer_kv[kind]
        batch = layer.keys.shape[0]
        device = layer.keys.device
        # the stock compressor's dtypes: a bf16 checkpoint loads its position biases in fp32, so its gates are fp32
        dtype = module.kv_proj.weight.dtype
        gate_dtype = torch.promote_types(module.gate_proj.weight.dtype, module.position_bias.dtype)
        features = 2 * head_dim if overlap else head_dim
        self.kv = torch.zeros(batch, ratio, features, device=device, dtype=dtype)
        self.gate = torch.zeros(batch, ratio, features, device=device, dtype=gate_dtype)
        filled = tokens % ratio
        if filled:
            self.kv[:, :filled] = buffered
            self.gate[:, :filled] = layer.buffer_gate[kind] + module.position_bias[:filled]
        if overlap:
            self.prior_kv = torch.zeros(batch, ratio, head_dim, device=device, dtype=dtype)
            self.prior_gate = torch.full((batch, ratio, head_dim), NEG_INF, device=device, dtype=gate_dtype)
            if layer.overlap_kv[kind] is not None:
                self.prior_kv.copy_(layer.overlap_kv[kind])
                self.prior_gate.copy_(layer.overlap_gate[kind])

    def entry(self, hidden_states: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        """hidden_states (batch, 1, hidden); token () long, the cache index t. Returns (batch, head_dim)."""
        module = self.module
        ratio, head_dim = module.compress_rate, module.head_dim
        slot = (token % ratio).view(1)
        kv, gate = module.kv_proj(hidden_states), module.gate_proj(hidden_states)  # (batch, 1, features)
        self.kv.index_copy_(1, slot, kv)
        self.gate.index_copy_(1, slot, gate + module.position_bias.index_select(0, slot))
        filled = (torch.arange(ratio, device=slot.device) <= slot).view(1, ratio, 1)
        if self.overlap:
            series_kv = torch.cat([self.prior_kv, self.kv[..., head_dim:]], dim=1)
            series_gate = torch.cat([self.prior_gate, self.gate[..., head_dim:].masked_fill(~filled, NEG_INF)], dim=1)
        else:
            series_kv, series_gate = self.kv, self.gate.masked_fill(~filled, NEG_INF)
        weights = series_gate.softmax(dim=1, dtype=torch.float32).to(series_kv.dtype)
        compressed = module.kv_norm((series_kv * weights).sum(dim=1, keepdim=True))  # (batch, 1, head_dim)
        position = ((token // ratio) * ratio).view(1, 1).expand(compressed.shape[0], 1)
        cos, sin = module.rotary_emb(compressed, position_ids=position, layer_type=module.rope_layer_type)
        compressed = apply_rotary_pos_emb(compressed.unsqueeze(1), cos, sin)[:, 0, 0]
        if self.overlap:  # a closing window's first half becomes the next window's prior
            closing = slot == ratio - 1
            self.prior_kv.copy_(torch.where(closing, self.kv[..., :head_dim], self.prior_kv))
            self.prior_gate.copy_(torch.where(closing, self.gate[..., :head_dim], self.prior_gate))
        return compressed

    def write_back(self, layer, tokens: int) -> None:
        """Put the state back into the stock cache layer (for an eager forward after in-place decode)."""
        filled, head_dim = tokens % self.module.compress_rate, self.module.head_dim
        layer.buffer_kv[self.kind] = self.kv[:, :filled].clone()
        layer.buffer_gate[self.kind] = (self.gate[:, :filled] - self.module.position_bias[:filled]).clone()
        if self.overlap and tokens >= self.module.compress_rate:
            layer.overlap_kv[self.kind] = self.prior_kv.clone()
            layer.overlap_gate[self.kind] = self.prior_gate.clone()


class StaticLayer:
    """The fixed state of one decoder layer's attention."""

    def __init__(self, attention, layer, padding_mask, tokens: int, capacity: dict):
        self.kind = attention.layer_type
        self.layer = layer
        batch, device, dtype = layer.keys.shape[0], layer.keys.device, layer.keys.dtype
        self.window = StaticWindow(layer.keys, padding_mask, tokens, attention.sliding_window, (batch, attention.head_dim, device, dtype))
        self.compressors = {}
        if self.kind == HCA_LAYER_TYPE:
            self.compressors[KV] = StaticCompressor(attention.compressor, layer, KV, overlap=False, tokens=tokens)
            made = layer.compressed_kv[KV]
            self.entries = torch.zeros(batch, capacity["hca_entries"], attention.head_dim, device=device, dtype=dtype)
            if made is not None and made.shape[1]:
                self.entries[:, : made.shape[1]] = made
        elif self.kind == CSA_LAYER_TYPE:
            self.compressors[KV] = StaticCompressor(attention.compressor, layer, KV, overlap=True, tokens=tokens)
            self.compressors[INDEX_KEYS] = StaticCompressor(attention.compressor.indexer, layer, INDEX_KEYS, overlap=True, tokens=tokens)
            self.buffers = layer.in_place_buffers()
            width = capacity["resident_chunks"]
            self.tail_reserve = capacity["tail_reserve"]
            self.candidate_slots = torch.full((batch, width + self.tail_reserve), -1, dtype=torch.long, device=device)
            self.candidate_ids = torch.full_like(self.candidate_slots, -1)
            self.resident_rows = torch.zeros((), dtype=torch.long, device=device)
            self.tail_start = torch.zeros((), dtype=torch.long, device=device)
            self.observed = torch.zeros(batch, attention.config.hidden_size, device=device, dtype=dtype)
            self.refresh_candidates()

    def refresh_candidates(self) -> None:
        """After a recall (between steps): the resident part of the candidate table and the tail's origin."""
        layer: LookaheadCSALayer = self.layer
        width = self.candidate_slots.shape[1] - self.tail_reserve
        slots, ids = layer.resident_table(width)
        self.candidate_slots[:, :width] = slots
        self.candidate_ids[:, :width] = ids
        self.resident_rows.fill_(layer.resident_rows)
        self.tail_start.fill_(layer.recall_horizon)

    def write_back(self, tokens: int) -> None:
        """Put the window and the compressors' state back into the stock cache layer."""
        self.layer.keys = self.window.stock_keys(tokens)
        self.layer.values = self.layer.keys
        for compressor in self.compressors.values():
            compressor.write_back(self.layer, tokens)
        if self.kind == HCA_LAYER_TYPE:
            self.layer.compressed_kv[KV] = self.entries[:, : self.layer.entry_count[KV]].clone()


def _tensor_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.nbytes
    if isinstance(value, dict):
        return sum(_tensor_bytes(item) for item in value.values())
    if isinstance(value, (StaticWindow, StaticCompressor)):
        return _tensor_bytes(vars(value))
    return 0


class StaticDecodeState:
    """What a fixed-shape decode step reads and writes: inputs (input_ids, token, position, token_valid) and every
    layer's state. Passed to the model as its `past_key_values`; the patched attention routes here."""

    def __init__(self, model, cache, padding_mask: torch.Tensor | None, capacity: dict):
        tokens = cache.get_seq_length()
        batch = cache.layers[0].keys.shape[0]
        device = cache.layers[0].keys.device
        self.input_ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.token = torch.full((), tokens, dtype=torch.long, device=device)
        self.position = torch.full((batch, 1), tokens, dtype=torch.long, device=device)
        self.token_valid = torch.ones(batch, dtype=torch.bool, device=device)
        self.layers = [
            StaticLayer(decoder.self_attn, cache.layers[index], padding_mask, tokens, capacity)
            for index, decoder in enumerate(model.model.layers)
        ]

    def nbytes(self) -> int:
        """Device bytes of the fixed state, measured from its tensors; the CSA layers' hot-set tables are the
        cache's own (counted by its report) and left out."""
        own = [self.input_ids, self.token, self.position, self.token_valid]
        for static in self.layers:
            own += [static.window, static.compressors]
            own += [getattr(static, name, None) for name in ("entries", "candidate_slots", "candidate_ids", "resident_rows", "tail_start", "observed")]
        return sum(_tensor_bytes(item) for item in own)


def static_attention_forward(attention, state: StaticDecodeState, hidden_states, position_embeddings):
    """DeepseekV4Attention.forward for one decode token on fixed buffers: (output (batch, 1, hidden), None)."""
    static = state.layers[attention.layer_idx]
    token = state.token
    cos, sin = position_embeddings[attention.rope_layer_type]
    q, kv, q_residual = project_query_and_kv(attention, hidden_states, cos, sin)  # q (batch, heads, 1, head_dim)
    static.window.write(kv[:, 0, 0], (token % static.window.window).view(1), state.token_valid)
    batch = hidden_states.shape[0]
    if static.kind == CSA_LAYER_TYPE:
        table, picked = _csa_picks(attention, static, hidden_states, q_residual, state.position, token)
    elif static.kind == HCA_LAYER_TYPE:
        table, picked = _hca_picks(attention, static, hidden_states, token)
    else:
        table, picked = kv[:, 0, 0], torch.full((batch, 1), -1, dtype=torch.long, device=kv.device)
    out = sparse_decode_attention(q[:, :, 0], static.window.kv, static.window.bias, table, picked, attention.sinks, attention.scaling)
    return project_output(attention, out.unsqueeze(1), cos, sin), None


def _hca_picks(attention, static: StaticLayer, hidden_states, token):
    """Every HCA entry made before this token's window closes (as the stock decode attends them all)."""
    entry = static.compressors[KV].entry(hidden_states, token)
    ratio = attention.compressor.compress_rate
    static.entries.index_copy_(1, (token // ratio).view(1), entry.unsqueeze(1))
    batch, capacity = static.entries.shape[:2]
    ids = torch.arange(capacity, device=entry.device)
    rows = torch.arange(batch, device=entry.device).unsqueeze(1) * capacity + ids
    picked = torch.where(ids < (token + 1) // ratio, rows, -1)
    return static.entries.view(batch * capacity, -1), picked


def _csa_picks(attention, static: StaticLayer, hidden_states, q_residual, position, token):
    """The LSA CSA step: compress into the tail in place, then the native top-k among the candidates."""
    compressor = attention.compressor
    ratio = compressor.compress_rate
    batch = hidden_states.shape[0]
    static.observed.copy_(hidden_states[:, -1])
    chunk = token // ratio  # the entry of the window in progress; complete when token % ratio == ratio - 1
    sequences = torch.arange(batch, device=hidden_states.device)
    tail_rows = static.resident_rows + (chunk - static.tail_start) * batch + sequences  # (batch,)
    buffers = static.buffers
    buffers["kv_table"].index_copy_(0, tail_rows, static.compressors[KV].entry(hidden_states, token))
    key = static.compressors[INDEX_KEYS].entry(hidden_states, token)
    if "key_history" in buffers:
        buffers["key_history"].index_copy_(1, chunk.view(1), key.unsqueeze(1))
    else:
        buffers["key_table"].index_copy_(0, tail_rows, key)
    steps = torch.arange(static.tail_reserve, device=tail_rows.device)
    tail_ids = static.tail_start + steps  # (tail,)
    tail_slots = static.resident_rows + steps.unsqueeze(0) * batch + sequences.unsqueeze(1)  # (batch, tail)
    width = static.candidate_slots.shape[1] - static.tail_reserve
    in_tail = (tail_ids <= chunk).unsqueeze(0)
    static.candidate_slots[:, width:] = torch.where(in_tail, tail_slots, -1)
    static.candidate_ids[:, width:] = torch.where(in_tail, tail_ids.unsqueeze(0), -1).expand(batch, -1)
    slots, ids = static.candidate_slots, static.candidate_ids
    if "key_history" in buffers:
        history = buffers["key_history"]
        keys = history.view(batch * history.shape[1], -1)
        key_slots = torch.where(ids >= 0, sequences.unsqueeze(1) * history.shape[1] + ids, -1)
    else:
        keys, key_slots = buffers["key_table"], slots
    index_q, weights = native_index_query(compressor.indexer, hidden_states, q_residual, position)
    visible = (ids >= 0) & (ids < (position + 1) // ratio)
    top, _ = level2_topk(index_q[:, 0], weights[:, 0], keys, key_slots, visible, compressor.indexer.index_topk, compressor.indexer.scorer.softmax_scale)
    picked = slots.gather(1, top.clamp(min=0)).masked_fill(top < 0, -1)
    return buffers["kv_table"], picked
