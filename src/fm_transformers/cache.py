"""OffloadedLookaheadCache: a transformers Cache whose CSA layers keep their compressed KV in a host pool.

Sliding-window and HCA layers keep the stock cache layers. Each CSA layer becomes a `LookaheadCSALayer`:
every compressed entry goes to its cold pool as it is made (so the pool always equals the stock cache),
and the device holds only the resident chunks plus the tail made since the last recall; during a prefill
it holds the layer's whole history, which the prefill attention reads in place.

The cache owns the level-1 schedule (`Level1Schedule`): the policy looks at the last token of every prefill
forward, its resident set is recalled once the prefill is over, then again every `tau` decode steps; every
CSA layer then fetches the policy's resident set (on its own CUDA stream, overlapping the rest of the
forward) and uses it from the next forward on. Refresh layers, if configured, may add the chunks their
native top-k wants in between (`refresh_on_miss`). The policy itself is built at the edge
(`policies.policy_from_config`); the cache never knows which one it has.
"""

import torch
from tqdm.auto import tqdm
from transformers.cache_utils import DynamicCache
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4CSACache

from .config import LSAConfig
from .layout import csa_compress_rate, csa_layers, require_deepseek_v4
from .policies import (
    ResidentPolicy,
    SelectionContext,
    all_resident,
    policy_from_config,
    raise_picked_priorities,
    resident_sets,
    same_sets,
)
from .cold_pool import ColdPool
from .pool import DeviceHistory, HotSet
from .report import memory_report, stock_layer_bytes

KV, INDEX_KEYS = "compressor", "indexer"
# A prefill of at least this many chunks shows a progress bar unless LSAConfig.prefill_progress says otherwise.
PROGRESS_MIN_CHUNKS = 8


class LookaheadCSALayer(DeepseekV4CSACache):
    """The CSA cache layer of LSA. Compression state (buffers, overlap) stays as in the stock layer;
    compressed entries go to the cold pool and the hot set instead of one growing device tensor.

    Its narrow API is all the attention reads: `store_entries` while compressing, `history` during a
    prefill, `level2_candidates` / `candidate_index_keys` / `kv_table` in decode, `all_index_keys` for
    level 1 and the refresh. Nothing outside this layer touches its `HotSet`.
    """

    _layer_type = None  # keep transformers' layer registry pointing at the stock CSA layer

    def __init__(
        self,
        config,
        keep_index_keys_on_device: bool,
        pool_dtype: torch.dtype | None,
        tail_reserve: int,
        copy_stream: "torch.cuda.Stream | None",
    ):
        super().__init__(config)
        self.dims = {KV: config.head_dim, INDEX_KEYS: config.index_head_dim}
        self.keep_index_keys_on_device = keep_index_keys_on_device
        self.pool_dtype, self.pin_memory = pool_dtype, copy_stream is not None  # pinned slabs when on a GPU
        self.tail_reserve, self.copy_stream = tail_reserve, copy_stream
        self._reset_storage()

    def _reset_storage(self):
        self.pools: dict[str, ColdPool] = {}
        self._hot: HotSet | None = None
        self._index_keys: DeviceHistory | None = None  # target and refresh layers: every indexer key on the device
        self.has_resident_set = False
        self.recalls = 0
        self.refreshes = 0
        self.chunks_fetched = 0
        self.bytes_fetched = 0

    def _lazy_init_storage(self, entries: torch.Tensor):
        batch, device, dtype = entries.shape[0], entries.device, entries.dtype
        pool_dtype = self.pool_dtype or dtype
        self.pools = {kind: ColdPool(batch, dim, pool_dtype, self.pin_memory) for kind, dim in self.dims.items()}
        hot_kinds = {KV: self.dims[KV]} if self.keep_index_keys_on_device else dict(self.dims)
        self._hot = HotSet(hot_kinds, batch, device, dtype, self.tail_reserve, self.copy_stream)
        if self.keep_index_keys_on_device:
            self._index_keys = DeviceHistory(batch, self.dims[INDEX_KEYS], device, dtype)

    @property
    def num_chunks(self) -> int:
        return self.entry_count[KV]

    @property
    def is_empty(self) -> bool:
        return self._hot is None

    def store_entries(self, kind: str, compressed: torch.Tensor) -> None:
        """Store freshly made entries (batch, n, dim) of `kind`: to the pool always, and to the device."""
        if self._hot is None:
            self._lazy_init_storage(compressed)
        self.pools[kind].append(compressed)
        self.entry_count[kind] += compressed.shape[1]
        if kind in self._hot.kinds:
            self._hot.append_tail(kind, compressed)
        if kind == INDEX_KEYS and self._index_keys is not None:
            self._index_keys.append(compressed)

    def update_compressor_states(self, name: str, compressed: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(
            "an LSA CSA layer is run by fm_transformers' patched attention, not by the stock compressor: "
            "call fm_transformers.apply_lsa_patch() (importing fm_transformers does)"
        )

    # Prefill: the whole history on the device, read in place.

    def begin_prefill(self) -> None:
        """Before a multi-token forward: if a recall left only a resident subset on the device (a prefill that
        continues a sequence after decode), bring the whole history back once, not per chunk."""
        if self._hot is not None and self.has_resident_set:
            self._hot.load_history(self.num_chunks, self._fetch)
            self.has_resident_set = False

    def history(self, kind: str) -> torch.Tensor:
        """(chunks, batch, dim) view of every entry of `kind` on the device, valid during a prefill."""
        if kind == INDEX_KEYS and self._index_keys is not None:
            return self._index_keys.entries.transpose(0, 1)
        return self._hot.history(kind)

    # Decode: level 2 over the resident chunks and the tail.

    def level2_candidates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(slot_index, chunk_ids), both (batch, candidates), -1 padded: resident chunks then the tail."""
        return self._hot.candidates()

    def kv_table(self) -> torch.Tensor:
        """(rows, head_dim): the compressed KV slots that `level2_candidates` slot indices address."""
        return self._hot.table(KV)

    def candidate_index_keys(self, slot_index: torch.Tensor, chunk_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(key table (rows, index_head_dim), slots (batch, n)) addressing the candidates' native indexer keys;
        -1 where the candidate slot is padding."""
        if self._index_keys is None:
            return self._hot.table(INDEX_KEYS), slot_index
        keys = self._index_keys.entries
        batch, chunks, dim = keys.shape
        rows = torch.arange(batch, device=chunk_ids.device).unsqueeze(1) * chunks
        return keys.reshape(batch * chunks, dim), torch.where(chunk_ids >= 0, rows + chunk_ids, -1)

    def all_index_keys(self) -> torch.Tensor:
        """(batch, chunks, index_head_dim): every native indexer key; target and refresh layers only."""
        if self._index_keys is None:
            raise RuntimeError("only target and refresh layers keep every indexer key on the device")
        return self._index_keys.entries

    # Level 1: recalls.

    @property
    def recall_horizon(self) -> int:
        """Chunks below it were judged by the last recall; chunks from it on are in the tail."""
        return self._hot.tail_start

    def resident_ids(self) -> list[torch.Tensor]:
        return self._hot.resident_ids()

    def recall(self, chunk_ids: list[torch.Tensor], num_chunks: int, refresh: bool = False) -> None:
        """Make `chunk_ids[b]` (sorted, < num_chunks) the resident set of sequence b: keep what is on the
        device, fetch the rest from the pool (asynchronously on a GPU, see HotSet). A `refresh` (mid-window,
        see OffloadedLookaheadCache.refresh_on_miss) is counted apart from the level-1 recalls."""
        self.flush_to_pool()
        self.chunks_fetched += self._hot.recall(chunk_ids, num_chunks, self._fetch)
        self.has_resident_set = True
        if refresh:
            self.refreshes += 1
        else:
            self.recalls += 1

    # In-place decode (decode_graph.py): fixed buffers that a captured CUDA graph writes and reads.

    def fix_capacity(self, resident_chunks: int | None, history_chunks: int | None = None) -> None:
        """Keep the device buffers at a fixed size (None: grow freely again): room for `resident_chunks` per
        sequence plus the tail reserve in the hot set, and `history_chunks` per sequence of indexer keys on
        target and refresh layers. Raises pool.CapacityExceeded if what is stored does not fit."""
        batch = self._hot.batch_size
        rows = None if resident_chunks is None else (resident_chunks + self._hot.tail_reserve) * batch
        self._hot.fix_capacity(rows)
        if self._index_keys is not None:
            self._index_keys.fix_capacity(history_chunks)

    def in_place_buffers(self) -> dict[str, torch.Tensor]:
        """The fixed buffers: "kv_table" (rows, head_dim) and either "key_table" (rows, index_head_dim), rows as
        kv_table's, or "key_history" (batch, capacity, index_head_dim) on target and refresh layers."""
        buffers = {"kv_table": self._hot.table(KV)}
        if self._index_keys is not None:
            buffers["key_history"] = self._index_keys.buffer
        else:
            buffers["key_table"] = self._hot.table(INDEX_KEYS)
        return buffers

    @property
    def has_fixed_capacity(self) -> bool:
        """False once a recall outgrew the fixed capacity (the hot set then grows freely again)."""
        return self._hot.fixed_rows is not None

    @property
    def resident_rows(self) -> int:
        """Table rows of the resident chunks of all sequences; the tail starts after them."""
        return self._hot.resident_rows

    def resident_table(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(slot_index, chunk_ids) (batch, width), -1 padded: each sequence's resident chunks and their rows."""
        return self._hot.resident_table(width)

    def account_in_place_entries(self, count: int) -> None:
        """Count `count` entries per sequence (of both kinds) that were written in place after the tail and
        the indexer-key history, as store_entries would have; they reach the pool at `flush_to_pool`."""
        for kind in self.dims:
            self.entry_count[kind] += count
        self._hot.account_tail(count)
        if self._index_keys is not None:
            self._index_keys.account(count)

    def flush_to_pool(self, non_blocking: bool = False) -> None:
        """Copy to the cold pool the entries written in place since the last flush, so that it again holds
        every entry made (its invariant); before every recall and every report."""
        for kind, pool in self.pools.items():
            stop = self.entry_count[kind]
            if pool.length == stop:
                continue
            if kind == INDEX_KEYS and self._index_keys is not None:
                pool.append(self._index_keys.entries[:, pool.length : stop], non_blocking)
            else:
                start = self._hot.tail_start
                pool.append(self._hot.tail(kind)[:, pool.length - start : stop - start], non_blocking)

    def _fetch(self, kind, rows, chunk_ids, dst, dst_rows):
        """The hot set's fetch from the pool of `kind`; counts the host bytes it reads (pool entries as stored)."""
        pool = self.pools[kind]
        self.bytes_fetched += chunk_ids.numel() * pool.entry_bytes()
        return pool.fetch_into(rows, chunk_ids, dst, dst_rows)

    def memory(self) -> dict:
        """This layer's bytes by place and kind, read off its tensors (see report.py)."""
        if self._hot is None:
            return {}
        self.flush_to_pool()
        resident_kv, tail_kv = self._hot.device_bytes(KV)
        if self._index_keys is not None:
            index_keys, room = self._index_keys.nbytes(), self._index_keys.spare_bytes()
        else:
            index_keys, room = sum(self._hot.device_bytes(INDEX_KEYS)), 0
        # The stock cache holds the pools' entries at the model's dtype (the pools equal it).
        stock_bytes = sum(pool.length * pool.batch_size * pool.dim for pool in self.pools.values()) * self._hot.dtype.itemsize
        return {
            "resident_kv": resident_kv,
            "tail_kv": tail_kv,
            "index_keys": index_keys,
            "index_keys_in_full": self._index_keys is not None,
            "tail_room": self._hot.spare_bytes() + room,
            "window_and_state": stock_layer_bytes(self),  # window, buffers, overlap (no compressed_kv here)
            "host_kv_stored": self.pools[KV].stored_bytes(),
            "host_index_keys_stored": self.pools[INDEX_KEYS].stored_bytes(),
            "host_allocated": sum(pool.allocated_bytes() for pool in self.pools.values()),
            "full_bytes": stock_bytes,
            "ranges_fetched": int(self._hot.fetched_ranges),
            "resident_chunks": self._hot.resident_count(),
            "chunks": self.num_chunks * self._hot.batch_size,
        }

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        for pool in self.pools.values():
            pool.reorder(beam_idx)
        if self._hot is not None:
            self._hot.reorder(beam_idx)
        if self._index_keys is not None:
            self._index_keys.reorder(beam_idx)

    def reset(self) -> None:
        super().reset()
        if self._hot is not None:
            self._hot.finish()
        self._reset_storage()


class Level1Schedule:
    """When level 1 runs: at the end of every prefill forward the policy looks at the last token, and the
    last look is recalled when the prefill is over (`pending`); then every `tau` decode steps."""

    def __init__(self, tau: int):
        self.tau = tau
        self.reset()

    def reset(self) -> None:
        self.triggering = False
        self.steps_since_trigger = 0
        self.trigger_count = 0
        self.pending: tuple[torch.Tensor, SelectionContext] | None = None  # (priorities, context) of a prefill

    def start_forward(self, seq_len: int) -> None:
        if seq_len > 1 or self.trigger_count == 0:
            self.triggering = True
        else:
            self.steps_since_trigger += 1
            self.triggering = self.steps_since_trigger >= self.tau

    def fired(self) -> None:
        self.trigger_count += 1
        self.steps_since_trigger = 0
        self.triggering = False
        self.pending = None


class OffloadedLookaheadCache(DynamicCache):
    """The LSA cache for a DeepSeek-V4 model: `past_key_values=OffloadedLookaheadCache(model)` or
    `generate(..., cache_implementation="lsa")`.

    `policy` decides the resident sets (default: the attached memory indexer, see `policy_from_config`).
    """

    def __init__(self, model, config: LSAConfig | dict | None = None, policy: ResidentPolicy | None = None):
        require_deepseek_v4(model)
        self.lsa_config = config if isinstance(config, LSAConfig) else LSAConfig.from_dict(config)
        self.policy = policy_from_config(model, self.lsa_config, policy)
        model_config = model.config.get_text_config(decoder=True)
        super().__init__(config=model_config)
        self.layer_types = tuple(model_config.layer_types)
        self.csa_layers = csa_layers(model_config)
        self._check_layers("policy target layers", self.policy.target_layers)
        self.refresh_layers = self.lsa_config.refresh_layers or ()
        self._check_layers("refresh_layers", self.refresh_layers)
        device = next(model.parameters()).device
        pool_dtype = None if self.lsa_config.pool_dtype is None else self.lsa_config.torch_pool_dtype(model.dtype)
        self.compress_rate = csa_compress_rate(model_config)
        copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None  # recalls of every CSA layer
        self.tail_reserve = -(-self.lsa_config.tau // self.compress_rate) + 1  # chunks made between two recalls
        for index in self.csa_layers:
            self.layers[index] = LookaheadCSALayer(
                model_config,
                keep_index_keys_on_device=index in self.policy.target_layers or index in self.refresh_layers,
                pool_dtype=pool_dtype,
                tail_reserve=self.tail_reserve,
                copy_stream=copy_stream,
            )
        self.schedule = Level1Schedule(self.lsa_config.tau)
        # (batch, chunks): the priorities behind the resident set, the last trigger's raised by refreshes since
        self.resident_priorities: torch.Tensor | None = None
        self._forward_len = 0
        self._progress: tqdm | None = None
        self.decode_graph = None  # decode_graph.DecodeGraph when generate decodes through a CUDA graph

    def _check_layers(self, name: str, layers) -> None:
        unknown = [layer for layer in layers if layer not in self.csa_layers]
        if unknown:
            raise ValueError(f"{name} {unknown} are not CSA layers (CSA layers: {self.csa_layers})")

    def begin_csa_layer(self, layer_idx: int, seq_len: int) -> LookaheadCSALayer:
        """Called by each CSA layer before it runs. At the first one: a decode step first recalls what a
        finished prefill left pending, then the schedule advances."""
        layer = self.layers[layer_idx]
        if layer_idx == self.csa_layers[0]:
            self._forward_len = seq_len
            if seq_len == 1:
                self.finish_prefill()
            self.schedule.start_forward(seq_len)
        if seq_len > 1:
            layer.begin_prefill()
        return layer

    def end_csa_layer(self, layer_idx: int, hidden_states: torch.Tensor, position_ids: torch.Tensor) -> None:
        """Called by each CSA layer after it ran, with the last token's hidden state (batch, hidden) and
        position (batch,): feeds the policy at a trigger; at the last CSA layer, a decode trigger starts the
        recall of every CSA layer (nothing reads their hot sets again in this forward), a prefill forward
        leaves its priorities pending."""
        if layer_idx == self.csa_layers[-1] and self._progress is not None:
            self._progress.update(self._forward_len)
        if not self.schedule.triggering:
            return
        if layer_idx in self.policy.target_layers:
            self.policy.observe(layer_idx, hidden_states, position_ids, self.layers[layer_idx].all_index_keys())
        if layer_idx != self.csa_layers[-1]:
            return
        priorities, context = self._choose(position_ids)
        if self._forward_len > 1:
            self.schedule.pending = (priorities, context)
            self.schedule.triggering = False
        else:
            self._recall(priorities, context)

    def trigger_recall(self, hidden_states: dict[int, torch.Tensor], position_ids: torch.Tensor) -> None:
        """Level 1 after a decode step run elsewhere (decode_graph.py): the policy observes each target layer's
        saved attention input (batch, hidden) at the step's position (batch,), then every CSA layer recalls."""
        for layer_idx in self.policy.target_layers:
            self.policy.observe(layer_idx, hidden_states[layer_idx], position_ids, self.layers[layer_idx].all_index_keys())
        self._recall(*self._choose(position_ids))

    def _choose(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, SelectionContext]:
        context = SelectionContext(
            num_chunks=self.layers[self.csa_layers[-1]].num_chunks,
            visible=(position_ids + 1) // self.compress_rate,
            trigger_index=self.schedule.trigger_count,
            device=position_ids.device,
        )
        return self.policy.priorities(context), context

    def _recall(self, priorities: torch.Tensor, context: SelectionContext) -> None:
        chunk_ids = resident_sets(priorities, context, self.lsa_config)
        for csa_layer in self.lookahead_layers():
            csa_layer.recall(chunk_ids, context.num_chunks)
        self.resident_priorities = priorities
        self.schedule.fired()

    def begin_prefill(self, prompt_tokens: int, chunk_size: int | None) -> None:
        """Called before a prefill of `prompt_tokens` in chunks of `chunk_size` (None: one forward): opens
        the progress bar when the prefill is long (see LSAConfig.prefill_progress)."""
        chunks = 1 if not chunk_size else -(-prompt_tokens // chunk_size)
        show = self.lsa_config.prefill_progress
        if show is None:
            show = chunks >= PROGRESS_MIN_CHUNKS
        if show:
            self._progress = tqdm(total=prompt_tokens, desc="LSA prefill", unit="tok", unit_scale=True)

    def finish_prefill(self) -> None:
        """Recall the resident set that the last prefill forward chose, so that from now on the device holds
        only it; close the progress bar. `generate` calls it after its prefill; a decode step calls it too."""
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        if self.schedule.pending is not None:
            self._recall(*self.schedule.pending)

    def refresh_on_miss(self, layer_idx: int, picks: torch.Tensor) -> None:
        """Called in a decode step by a refresh layer with its native top-k over the whole history, chunk ids
        (batch, k) in descending score order (-1 padded). Picks that the budget admits and that are not
        resident become resident in every CSA layer now (ranking: `policies.raise_picked_priorities`).

        The horizon stays: the tail (chunks made since the last trigger) is a candidate set already, so only
        the resident part below it changes, the same for every CSA layer whether or not it ran this step.
        """
        layer = self.layers[layer_idx]
        horizon = layer.recall_horizon
        if self.resident_priorities is None or horizon == 0:
            return
        priorities, below = raise_picked_priorities(self.resident_priorities.to(picks.device), picks, horizon)
        self.resident_priorities = priorities
        resident = layer.resident_ids()
        if all_resident(picks, below, resident, horizon):
            return  # raising resident chunks leaves the set as it is
        context = SelectionContext(horizon, torch.full((picks.shape[0],), horizon), self.schedule.trigger_count, picks.device)
        chunk_ids = resident_sets(priorities, context, self.lsa_config)
        if same_sets(chunk_ids, resident):
            return
        for csa_layer in self.lookahead_layers():
            csa_layer.recall(chunk_ids, horizon, refresh=True)

    def check_fits(self, layer_types) -> None:
        """Raise a clear error if this cache was built for a model with other layers (`layer_types` of the
        model it is used with)."""
        layer_types = tuple(layer_types)
        if layer_types != self.layer_types:
            raise ValueError(
                f"this OffloadedLookaheadCache was built for a model with {len(self.layer_types)} layers "
                f"({self.layer_types.count('compressed_sparse_attention')} CSA), the model has {len(layer_types)} "
                f"({layer_types.count('compressed_sparse_attention')} CSA): build the cache with this model"
            )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.stop_decode_graph()  # beams reorder every step: they decode eagerly
        super().reorder_cache(beam_idx)
        if self.resident_priorities is not None:
            rows = beam_idx.to(self.resident_priorities.device)
            self.resident_priorities = self.resident_priorities.index_select(0, rows)
        if self.schedule.pending is not None:
            priorities, context = self.schedule.pending
            rows = beam_idx.to(priorities.device)
            context.visible = context.visible.index_select(0, beam_idx.to(context.visible.device))
            self.schedule.pending = (priorities.index_select(0, rows), context)

    def reset(self) -> None:
        self.stop_decode_graph()
        super().reset()
        self.schedule.reset()
        self.resident_priorities = None

    def stop_decode_graph(self) -> None:
        """Leave CUDA-graph decode for good: its state goes back into the layers, its buffers are freed."""
        if self.decode_graph is not None:
            self.decode_graph.release()
            self.decode_graph = None

    @property
    def trigger_count(self) -> int:
        return self.schedule.trigger_count

    def lookahead_layers(self) -> list[LookaheadCSALayer]:
        return [self.layers[index] for index in self.csa_layers]

    def memory_report(self) -> dict:
        """Bytes on the device and the host by kind, measured from the tensors (see report.py)."""
        return memory_report(self)
