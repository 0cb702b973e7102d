"""OffloadedLookaheadCache: a transformers Cache whose CSA layers keep their compressed KV in a host pool.

Sliding-window and HCA layers keep the stock cache layers. Each CSA layer becomes a `LookaheadCSALayer`:
every compressed entry goes to its cold pool as it is made (so the pool always equals the stock cache),
and the device holds only the resident chunks plus the tail made since the last recall. The cache also
runs the level-1 schedule: a recall triggers after each prefill forward and every `tau` decode steps, at
the last CSA layer; every CSA layer then starts fetching the policy's resident set (on its own CUDA
stream, overlapping the rest of the forward) and uses it from the next forward on. Refresh layers, if
configured, may add the chunks their native top-k wants in between (`refresh_on_miss`).
"""

import torch
from transformers.cache_utils import DynamicCache
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4CSACache

from .config import LSAConfig
from .indexer import CSA_LAYER_TYPE, attached_memory_indexer
from .policies import MemoryIndexerPolicy, ResidentPolicy, SelectionContext, resident_sets
from .pool import ColdPool, HotSet
from .report import memory_report

KV, INDEX_KEYS = "compressor", "indexer"


def require_deepseek_v4(model) -> None:
    """Raise a clear error unless `model` is a transformers DeepSeek-V4 model."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type != "deepseek_v4":
        raise ValueError(
            f"Lookahead Sparse Attention works with DeepSeek-V4 models only; got {type(model).__name__} "
            f"(model_type={model_type!r})"
        )


def _memory_indexer_policy(model, config: LSAConfig) -> MemoryIndexerPolicy:
    indexer = attached_memory_indexer(model)
    if indexer is None:
        raise ValueError(
            "no memory indexer is attached to this model: call fm_transformers.attach_memory_indexer(model, "
            "'<indexer repo or dir>') first, or pass a policy to OffloadedLookaheadCache"
        )
    return MemoryIndexerPolicy(indexer, threshold=config.threshold, layers=config.indexer_layers)


class LookaheadCSALayer(DeepseekV4CSACache):
    """The CSA cache layer of LSA. Compression state (buffers, overlap) stays as in the stock layer;
    compressed entries go to the cold pool and the hot set instead of one growing device tensor.

    While `prefilling`, `update_compressor_states` returns the full history on the device, so the stock
    prefill math runs unchanged; in decode the patched attention reads candidates from the hot set.
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
        self.prefilling = True
        self._reset_storage()

    def _reset_storage(self):
        self.pools: dict[str, ColdPool] = {}
        self.hot: HotSet | None = None
        self.index_keys: torch.Tensor | None = None  # (batch, chunks, index_head_dim), target and refresh layers only
        self.has_resident_set = False
        self.recalls = 0
        self.refreshes = 0
        self.chunks_fetched = 0

    def _lazy_init_storage(self, entries: torch.Tensor):
        batch, device, dtype = entries.shape[0], entries.device, entries.dtype
        pool_dtype = self.pool_dtype or dtype
        self.pools = {kind: ColdPool(batch, dim, pool_dtype, self.pin_memory) for kind, dim in self.dims.items()}
        hot_kinds = {KV: self.dims[KV]} if self.keep_index_keys_on_device else dict(self.dims)
        self.hot = HotSet(hot_kinds, batch, device, dtype, self.tail_reserve, self.copy_stream)
        if self.keep_index_keys_on_device:
            self.index_keys = entries.new_zeros(batch, 0, self.dims[INDEX_KEYS])

    @property
    def num_chunks(self) -> int:
        return self.entry_count[KV]

    def update_compressor_states(self, name: str, compressed: torch.Tensor) -> torch.Tensor:
        """Store freshly made entries (batch, n, dim): to the pool always, to the device tail or index keys.
        Returns the full history on the device while prefilling (what the stock compressor expects)."""
        if self.hot is None:
            self._lazy_init_storage(compressed)
        self.pools[name].append(compressed)
        self.entry_count[name] += compressed.shape[1]
        if name in self.hot.kinds:
            self.hot.append_tail(name, compressed)
        if name == INDEX_KEYS and self.keep_index_keys_on_device:
            self.index_keys = torch.cat([self.index_keys, compressed], dim=1)
        return self._full_history(name) if self.prefilling else compressed

    def _full_history(self, name: str) -> torch.Tensor:
        if name == INDEX_KEYS and self.keep_index_keys_on_device:
            return self.index_keys
        tail = self.hot.tail(name)
        if self.hot.tail_start == 0:
            return tail
        older = self.pools[name].read(0, self.hot.tail_start).to(tail.device, tail.dtype)
        return torch.cat([older, tail], dim=1)

    def recall(self, chunk_ids: list[torch.Tensor], num_chunks: int, refresh: bool = False) -> None:
        """Make `chunk_ids[b]` (sorted, < num_chunks) the resident set of sequence b: keep what is on the
        device, fetch the rest from the pool (asynchronously on a GPU, see HotSet). A `refresh` (mid-window,
        see OffloadedLookaheadCache.refresh_on_miss) is counted apart from the level-1 recalls."""
        fetch = lambda kind, *where: self.pools[kind].fetch_into(*where)  # noqa: E731
        self.chunks_fetched += self.hot.recall(chunk_ids, num_chunks, fetch)
        self.has_resident_set = True
        if refresh:
            self.refreshes += 1
        else:
            self.recalls += 1

    def candidate_index_key_slots(self, slot_index: torch.Tensor, chunk_ids: torch.Tensor):
        """(key table (rows, index_head_dim), slots (batch, n)) addressing the candidates' native indexer keys;
        -1 where the candidate slot is padding."""
        if not self.keep_index_keys_on_device:
            return self.hot.table(INDEX_KEYS), slot_index
        batch, chunks, dim = self.index_keys.shape
        rows = torch.arange(batch, device=chunk_ids.device).unsqueeze(1) * chunks
        return self.index_keys.reshape(batch * chunks, dim), torch.where(chunk_ids >= 0, rows + chunk_ids, -1)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        for pool in self.pools.values():
            pool.reorder(beam_idx)
        if self.hot is not None:
            self.hot.reorder(beam_idx)
        if self.index_keys is not None:
            self.index_keys = self.index_keys.index_select(0, beam_idx.to(self.index_keys.device))

    def reset(self) -> None:
        super().reset()
        if self.hot is not None:
            self.hot.finish()
        self.prefilling = True
        self._reset_storage()


class OffloadedLookaheadCache(DynamicCache):
    """The LSA cache for a DeepSeek-V4 model: `past_key_values=OffloadedLookaheadCache(model)` or
    `generate(..., cache_implementation="lsa")`.

    `policy` decides the resident sets (default: the attached memory indexer with `config.threshold`).
    """

    def __init__(self, model, config: LSAConfig | dict | None = None, policy: ResidentPolicy | None = None):
        require_deepseek_v4(model)
        self.lsa_config = config if isinstance(config, LSAConfig) else LSAConfig.from_dict(config)
        self.policy = policy if policy is not None else _memory_indexer_policy(model, self.lsa_config)
        model_config = model.config.get_text_config(decoder=True)
        super().__init__(config=model_config)
        self.csa_layers = [i for i, kind in enumerate(model_config.layer_types) if kind == CSA_LAYER_TYPE]
        unknown = [layer for layer in self.policy.target_layers if layer not in self.csa_layers]
        if unknown:
            raise ValueError(f"policy target layers {unknown} are not CSA layers (CSA layers: {self.csa_layers})")
        self.refresh_layers = self.lsa_config.refresh_layers or ()
        unknown = [layer for layer in self.refresh_layers if layer not in self.csa_layers]
        if unknown:
            raise ValueError(f"refresh_layers {unknown} are not CSA layers (CSA layers: {self.csa_layers})")
        device = next(model.parameters()).device
        pool_dtype = None if self.lsa_config.pool_dtype is None else self.lsa_config.torch_pool_dtype(model.dtype)
        self.compress_rate = model_config.compress_rates[CSA_LAYER_TYPE]
        copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None  # recalls of every CSA layer
        for index in self.csa_layers:
            self.layers[index] = LookaheadCSALayer(
                model_config,
                keep_index_keys_on_device=index in self.policy.target_layers or index in self.refresh_layers,
                pool_dtype=pool_dtype,
                tail_reserve=-(-self.lsa_config.tau // self.compress_rate) + 1,  # chunks made between two recalls
                copy_stream=copy_stream,
            )
        self._reset_schedule()

    def _reset_schedule(self):
        self.triggering = False
        self.steps_since_trigger = 0
        self.trigger_count = 0
        # (batch, chunks): the priorities behind the resident set, the last trigger's raised by refreshes since
        self.resident_priorities: torch.Tensor | None = None

    def begin_csa_layer(self, layer_idx: int, seq_len: int) -> LookaheadCSALayer:
        """Called by each CSA layer before it runs: advances the schedule; says whether the layer prefills."""
        if layer_idx == self.csa_layers[0]:
            if seq_len > 1 or self.trigger_count == 0:
                self.triggering = True
            else:
                self.steps_since_trigger += 1
                self.triggering = self.steps_since_trigger >= self.lsa_config.tau
        layer = self.layers[layer_idx]
        layer.prefilling = seq_len > 1 or not layer.has_resident_set
        return layer

    def end_csa_layer(self, layer_idx: int, hidden_states: torch.Tensor, position_ids: torch.Tensor) -> None:
        """Called by each CSA layer after it ran, with the last token's hidden state (batch, hidden) and
        position (batch,): feeds the policy at a trigger; at the last CSA layer, starts the recall of every
        CSA layer (nothing reads their hot sets again in this forward)."""
        if not self.triggering:
            return
        layer = self.layers[layer_idx]
        if layer_idx in self.policy.target_layers:
            self.policy.observe(layer_idx, hidden_states, position_ids, layer.index_keys)
        if layer_idx == self.csa_layers[-1]:
            context = SelectionContext(
                num_chunks=layer.num_chunks,
                visible=(position_ids + 1) // self.compress_rate,
                trigger_index=self.trigger_count,
                device=hidden_states.device,
            )
            self.resident_priorities = self.policy.priorities(context)
            chunk_ids = resident_sets(self.resident_priorities, context, self.lsa_config)
            for csa_layer in self.lookahead_layers():
                csa_layer.recall(chunk_ids, layer.num_chunks)
            self.trigger_count += 1
            self.steps_since_trigger = 0
            self.triggering = False

    def refresh_on_miss(self, layer_idx: int, picks: torch.Tensor) -> None:
        """Called in a decode step by a refresh layer with its native top-k over the whole history, chunk ids
        (batch, k) in descending score order (-1 padded). Picks that the budget admits and that are not
        resident become resident in every CSA layer now.

        The picks rise above every priority so far (in their own order), so under a budget the chunks used
        longest ago go first and the last trigger's unused choices before them, until the next trigger.
        The horizon stays: the tail (chunks made since the last trigger) is a candidate set already, so only
        the resident part below it changes, the same for every CSA layer whether or not it ran this step.
        """
        layer = self.layers[layer_idx]
        horizon = layer.hot.tail_start
        if self.resident_priorities is None or horizon == 0:
            return
        priorities = self.resident_priorities.to(picks.device)  # (batch, horizon): the trigger fixed both
        highest = priorities.masked_fill(~torch.isfinite(priorities), 0.0).max().clamp(min=0.0)  # no host sync
        rank_priority = highest + 1.0 + torch.arange(picks.shape[1], 0, -1, device=picks.device, dtype=torch.float32)
        below = (picks >= 0) & (picks < horizon)  # picks in the tail are candidates already
        with_spare = torch.cat([priorities, priorities.new_zeros(picks.shape[0], 1)], dim=1)  # column `horizon`: discard
        with_spare.scatter_(1, torch.where(below, picks, horizon), rank_priority.expand_as(picks).contiguous())
        self.resident_priorities = priorities = with_spare[:, :horizon]
        resident = layer.hot.chunk_ids
        if all(torch.isin(picks[row][below[row]], resident[row]).all() for row in range(picks.shape[0])):
            return  # raising resident chunks leaves the set as it is
        context = SelectionContext(horizon, torch.full((picks.shape[0],), horizon), self.trigger_count, picks.device)
        chunk_ids = resident_sets(priorities, context, self.lsa_config)
        if all(torch.equal(new, old) for new, old in zip(chunk_ids, resident)):
            return
        for csa_layer in self.lookahead_layers():
            csa_layer.recall(chunk_ids, horizon, refresh=True)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.resident_priorities is not None:
            rows = beam_idx.to(self.resident_priorities.device)
            self.resident_priorities = self.resident_priorities.index_select(0, rows)

    def reset(self) -> None:
        super().reset()
        self._reset_schedule()

    def lookahead_layers(self) -> list[LookaheadCSALayer]:
        return [self.layers[index] for index in self.csa_layers]

    def memory_report(self) -> dict:
        """Bytes on the device and the host by kind, measured from the tensors (see report.py)."""
        return memory_report(self)
