"""LSA decode through a captured CUDA graph: the whole model step replayed with one launch.

At batch 1 an eager DeepSeek-V4 decode step is mostly the host launching ~500 kernels a layer. `DecodeGraph`
runs the fixed-shape step of static_decode.py instead: the first step after a (re)build runs it eagerly, which
also warms the kernels up; the next one captures it; every later step copies its inputs into fixed buffers
and replays. What needs the host stays outside the replay, between steps: the level-1 trigger (the memory
indexer reads the hidden states the step saved), the recall (on the copy stream, as in eager decode), the
pool's copies of each completed entry (queued without waiting) and the cache's counters.

One graph per bucket: batch size, resident capacity (a power of two of chunks per sequence), and room for
the tokens to come (generate's max_length, or more when exceeded). A recall that needs more resident room,
or a step past the room, writes the state back into the cache's layers and builds a larger bucket.
Refresh on a miss needs a host decision inside the step, so a cache with `refresh_layers` decodes eagerly.
"""

import contextlib

import torch

from .cache import OffloadedLookaheadCache
from .layout import CSA_LAYER_TYPE, HCA_LAYER_TYPE
from .static_decode import StaticDecodeState

MIN_RESIDENT_CAPACITY = 64
# Tokens of room a bucket adds past what is known to come (generate's max_length), so a longer run rebuilds rarely.
ROOM_TOKENS = 4096


@contextlib.contextmanager
def graph_safe_experts(model):
    """Run the MoE experts without host syncs (the eager experts loop over `nonzero()`): transformers'
    grouped_mm for bf16 weights on CUDA, batched_mm otherwise."""
    config = model.config
    previous = config._experts_implementation
    weights_dtype = next(model.parameters()).dtype
    on_cuda = next(model.parameters()).is_cuda
    config._experts_implementation = "grouped_mm" if on_cuda and weights_dtype == torch.bfloat16 else "batched_mm"
    try:
        yield
    finally:
        config._experts_implementation = previous


class DecodeGraph:
    """Decode steps of one OffloadedLookaheadCache through the fixed-shape step; `capture=False` runs that
    step eagerly (the CPU, and tests comparing the replay with it)."""

    def __init__(self, model, cache: OffloadedLookaheadCache, capture: bool = True, max_length: int | None = None):
        if cache.refresh_layers:
            raise ValueError("refresh_layers decide on the host inside the step: decode with cuda_graph=False")
        self.model, self.cache, self.capture = model, cache, capture
        self.max_length = max_length
        self.state: StaticDecodeState | None = None
        self.graph: "torch.cuda.CUDAGraph | None" = None
        self.logits: torch.Tensor | None = None
        self.tokens = 0  # tokens in the cache; the step writes token `tokens`
        self.capacity: dict | None = None
        self.replays = 0
        self.captures = 0
        self._warm = False
        self._pool = None

    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (batch, 1, vocab) of the next token; input_ids (batch, 1), attention_mask (batch, tokens + 1)
        2D or None, position_ids (batch, 1) or None (the token's index in the cache, as the model does)."""
        cache = self.cache
        if self.state is None:
            cache.finish_prefill()
            self._build(attention_mask)
        elif not self._fits(self.tokens):
            self.release()
            self._build(attention_mask)
        cache.schedule.start_forward(1)
        state = self.state
        state.input_ids.copy_(input_ids)
        if attention_mask is None:
            state.token_valid.fill_(True)
        else:
            state.token_valid.copy_(attention_mask[:, -1])
        state.token.fill_(self.tokens)
        if position_ids is None:
            state.position.fill_(self.tokens)
        else:
            state.position.copy_(position_ids)
        for layer in cache.lookahead_layers():
            layer.kv_table()  # the current stream waits for the last recall's copies
        logits = self._run().clone()  # the graph's output buffer is overwritten by the next replay
        self._count_token()
        if cache.schedule.triggering:
            self._trigger()
        return logits

    def state_bytes(self) -> int:
        """Device bytes of the fixed state (0 when none is built); the graph's own pool of intermediates is
        not a tensor and shows in torch.cuda's allocator statistics only."""
        return self.state.nbytes() if self.state is not None else 0

    def release(self) -> None:
        """Write the fixed state back into the cache's layers (so eager forwards continue from it) and drop
        the buffers and the graph."""
        if self.state is None:
            return
        for static in self.state.layers:
            static.write_back(self.tokens)
        for layer in self.cache.lookahead_layers():
            layer.flush_to_pool()
            layer.fix_capacity(None)
        # The graph's private pool goes with it: a later capture into a dropped graph's pool, while a tensor
        # allocated in that pool is still alive, fails inside the CUDA caching allocator.
        self.state, self.graph, self.logits, self._warm, self._pool = None, None, None, False, None

    # Buckets.

    def _build(self, attention_mask: torch.Tensor | None) -> None:
        cache = self.cache
        self.tokens = cache.get_seq_length()
        self.capacity = self._bucket(self.tokens)
        for layer in cache.lookahead_layers():
            layer.fix_capacity(self.capacity["resident_chunks"], self.capacity["history_chunks"])
        self.state = StaticDecodeState(self.model, cache, attention_mask, self.capacity)

    def _bucket(self, tokens: int) -> dict:
        config = self.model.config
        room = max(self.max_length or 0, tokens + 1) + ROOM_TOKENS
        resident = max((ids.numel() for layer in self.cache.lookahead_layers() for ids in layer.resident_ids()), default=0)
        csa_rate = config.compress_rates[CSA_LAYER_TYPE]
        return {
            "resident_chunks": max(MIN_RESIDENT_CAPACITY, 1 << max(resident - 1, 0).bit_length()),
            "tail_reserve": self.cache.tail_reserve,
            "history_chunks": room // csa_rate + 1,
            "hca_entries": room // config.compress_rates.get(HCA_LAYER_TYPE, room) + 1,
            "room_tokens": room,
        }

    def _fits(self, token: int) -> bool:
        """Whether the bucket's buffers hold the entries of `token` (a recall that outgrows the resident room
        releases the bucket at once, see `_trigger`)."""
        return token < self.capacity["room_tokens"]

    # Steps.

    def _run(self) -> torch.Tensor:
        if not self.capture:
            return self._forward()
        if self.graph is None and self._warm:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=self._pool):
                self.logits = self._forward()
            self._pool = self.graph.pool()
            self.captures += 1
        if self.graph is not None:
            self.graph.replay()
            self.replays += 1
            return self.logits
        side = torch.cuda.Stream()  # the warm-up step runs eagerly off the default stream, as capture wants
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            logits = self._forward()
        torch.cuda.current_stream().wait_stream(side)
        self._warm = True
        return logits

    def _forward(self) -> torch.Tensor:
        state = self.state
        with torch.no_grad(), graph_safe_experts(self.model):
            hidden = self.model.model(
                input_ids=state.input_ids,
                position_ids=state.position,
                attention_mask={"lsa_static": None},  # masks come from the fixed state, not from transformers
                past_key_values=state,
                use_cache=True,
            ).last_hidden_state
            return self.model.lm_head(hidden[:, -1:])

    def _count_token(self) -> None:
        """The host side of the step just run: the layers' token counts and the entries completed in place."""
        token = self.tokens
        for static in self.state.layers:
            layer = static.layer
            layer.cumulative_length += 1
            if static.kind == CSA_LAYER_TYPE and (token + 1) % layer.compress_rate == 0:
                layer.account_in_place_entries(1)
                layer.flush_to_pool(non_blocking=True)  # queued after the step: the pool keeps every entry made
            elif static.kind == HCA_LAYER_TYPE and (token + 1) % layer.compress_rate == 0:
                layer.entry_count["compressor"] += 1
        self.tokens = token + 1

    def _trigger(self) -> None:
        """Level 1 after the step: the policy reads the target layers' saved hidden states, then the recall."""
        cache, state = self.cache, self.state
        observed = {index: state.layers[index].observed for index in cache.policy.target_layers}
        cache.trigger_recall(observed, state.position[:, 0].clone())
        width = self.capacity["resident_chunks"]
        for layer in cache.lookahead_layers():
            if not layer.has_fixed_capacity or max(ids.numel() for ids in layer.resident_ids()) > width:
                self.release()  # the recall outgrew this bucket: the next step builds a larger one
                return
        for static in state.layers:
            if static.kind == CSA_LAYER_TYPE:
                static.refresh_candidates()
