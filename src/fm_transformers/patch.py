"""The one place that touches transformers: patch DeepSeek-V4's attention (CSA layers under an LSA cache)
and register `cache_implementation="lsa"` with generate.

The patch is idempotent and removable. Before patching it checks that the classes look the way this code
was written for (transformers 5.23), so an upgrade that changes them fails loudly instead of silently.
"""

import copy
import inspect

from transformers import GenerationMixin
from transformers.generation import configuration_utils as generation_config_module
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as v4

from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from .attention import lsa_attention_forward
from .cache import OffloadedLookaheadCache
from .config import LSAConfig
from .decode_graph import DecodeGraph
from .layout import require_deepseek_v4
from .prefill import prefill_attention_forward
from .static_decode import StaticDecodeState, static_attention_forward

CACHE_IMPLEMENTATION = "lsa"
_ORIGINAL = "_fm_lsa_original"
_BOUNDED_PREFILL = "_fm_bounded_prefill"

_EXPECTED_METHODS = {
    v4.DeepseekV4Attention: ("forward",),
    v4.DeepseekV4ForCausalLM: ("forward",),
    v4.DeepseekV4CSACompressor: ("forward",),
    v4.DeepseekV4Indexer: ("forward",),
    v4.DeepseekV4CSACache: ("store_compression_weights", "update_overlap_state", "update_compressor_states", "reorder_cache"),
    GenerationMixin: ("_prepare_generation_config", "_prepare_cache_for_generation", "_prefill"),
}
# The stock methods the patch calls or replaces take these arguments (the compressor's are what attention passes).
_EXPECTED_PARAMETERS = {
    (v4.DeepseekV4Attention, "forward"): [
        "self", "hidden_states", "position_embeddings", "position_ids", "attention_mask", "past_key_values", "kwargs"
    ],
    (v4.DeepseekV4CSACompressor, "forward"): [
        "self", "hidden_states", "q_residual", "position_ids", "past_key_values", "layer_idx"
    ],
    (GenerationMixin, "_prepare_generation_config"): ["self", "generation_config", "kwargs"],
    (GenerationMixin, "_prefill"): ["self", "input_ids", "generation_config", "model_kwargs", "is_first_iteration"],
}


def check_transformers_compatibility() -> None:
    """Raise if transformers' DeepSeek-V4 differs from what the patch was written for."""
    for cls, methods in _EXPECTED_METHODS.items():
        for method in methods:
            if not callable(getattr(cls, method, None)):
                raise RuntimeError(
                    f"fm_transformers expects {cls.__name__}.{method} (transformers 5.23); this transformers lacks it. "
                    "Install a transformers version fm_transformers supports."
                )
    for (cls, method), expected in _EXPECTED_PARAMETERS.items():
        parameters = list(inspect.signature(_original(cls, method)).parameters)
        if parameters != expected:
            raise RuntimeError(
                f"{cls.__name__}.{method} takes {parameters}, fm_transformers was written for {expected}: "
                "install a transformers version fm_transformers supports"
            )
    if not isinstance(getattr(generation_config_module, "ALL_CACHE_IMPLEMENTATIONS", None), tuple):
        raise RuntimeError("transformers.generation.configuration_utils.ALL_CACHE_IMPLEMENTATIONS is missing")


def _original(cls, name):
    method = cls.__dict__.get(name) if name in cls.__dict__ else getattr(cls, name)
    return getattr(method, _ORIGINAL, method)


def _patched_attention_forward(self, hidden_states, position_embeddings, position_ids, attention_mask, past_key_values=None, **kwargs):
    stock_forward = _original(v4.DeepseekV4Attention, "forward")
    if isinstance(past_key_values, StaticDecodeState):
        return static_attention_forward(self, past_key_values, hidden_states, position_embeddings)
    if isinstance(past_key_values, OffloadedLookaheadCache):
        return lsa_attention_forward(
            self, stock_forward, hidden_states, position_embeddings, position_ids, attention_mask, past_key_values, **kwargs
        )
    if past_key_values is not None and hidden_states.shape[1] > 1 and getattr(self, _BOUNDED_PREFILL, False):
        return prefill_attention_forward(self, hidden_states, position_embeddings, position_ids, attention_mask, past_key_values)
    return stock_forward(self, hidden_states, position_embeddings, position_ids, attention_mask, past_key_values, **kwargs)


def _patched_prepare_generation_config(self, generation_config=None, **kwargs):
    """Refuse cache_implementation='lsa' with use_cache=False before transformers validates the generation config,
    which would first warn that the cache implementation has no effect: one error says it all."""
    if _requested(self, generation_config, kwargs, "cache_implementation") == CACHE_IMPLEMENTATION:
        if _requested(self, generation_config, kwargs, "use_cache") is False:
            raise ValueError("cache_implementation='lsa' needs use_cache=True: drop use_cache=False")
    return _original(GenerationMixin, "_prepare_generation_config")(self, generation_config, **kwargs)


def _requested(model, generation_config, kwargs: dict, name: str):
    """A generation setting as generate resolves it: its keyword argument, else the GenerationConfig passed to
    generate, else the model's own generation config (None where none sets it)."""
    for source in (kwargs, generation_config, getattr(model, "generation_config", None)):
        value = source.get(name) if isinstance(source, dict) else getattr(source, name, None)
        if value is not None:
            return value
    return None


def _patched_causal_lm_forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, **kwargs):
    """A decode step under an LSA cache with a DecodeGraph goes through it; any other forward first gives
    the graph's state back to the cache's layers."""
    stock_forward = _original(v4.DeepseekV4ForCausalLM, "forward")
    runner = getattr(past_key_values, "decode_graph", None)
    if runner is not None:
        plain_step = (
            input_ids is not None
            and input_ids.shape[1] == 1
            and (position_ids is None or position_ids.shape[1] == 1)
            and (attention_mask is None or attention_mask.dim() == 2)
            and not any(kwargs.get(name) for name in ("inputs_embeds", "labels", "output_router_logits", "output_hidden_states", "output_attentions"))
        )
        if plain_step:
            logits = runner.step(input_ids, attention_mask, position_ids)
            return MoeCausalLMOutputWithPast(logits=logits, past_key_values=past_key_values)
        runner.release()
    return stock_forward(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, past_key_values=past_key_values, **kwargs)


def _patched_prepare_cache(self, generation_config, model_kwargs, *args, **kwargs):
    stock_prepare = _original(GenerationMixin, "_prepare_cache_for_generation")
    if generation_config.cache_implementation != CACHE_IMPLEMENTATION:
        no_implementation = generation_config.cache_implementation is None and model_kwargs.get("past_key_values") is None
        if generation_config.cache_config and no_implementation and self.config.model_type == "deepseek_v4":
            raise ValueError(
                f"cache_config={generation_config.cache_config!r} does nothing without a cache implementation: "
                "add cache_implementation='lsa' to use Lookahead Sparse Attention"
            )
        return stock_prepare(self, generation_config, model_kwargs, *args, **kwargs)
    require_deepseek_v4(self)
    if model_kwargs.get("past_key_values") is not None:
        raise ValueError("pass either cache_implementation='lsa' or past_key_values, not both")
    options = dict(generation_config.cache_config or {})
    policy = options.pop("policy", None)
    cache = OffloadedLookaheadCache(self, LSAConfig.from_dict(options), policy=policy)
    if cache.lsa_config.cuda_graph and self.device.type == "cuda" and not cache.refresh_layers:
        cache.decode_graph = DecodeGraph(self, cache, max_length=generation_config.max_length)
    model_kwargs["past_key_values"] = cache


def _patched_prefill(self, input_ids, generation_config, model_kwargs, is_first_iteration=True):
    """Under an LSA cache: the prompt in chunks of LSAConfig.prefill_chunk_size unless generate's own
    `prefill_chunk_size` is set, a progress bar over a long prefill, and the level-1 recall once it is over."""
    stock_prefill = _original(GenerationMixin, "_prefill")
    cache = model_kwargs.get("past_key_values")
    if not isinstance(cache, OffloadedLookaheadCache):
        return stock_prefill(self, input_ids, generation_config, model_kwargs, is_first_iteration)
    if input_ids.shape[1] == 0:
        raise ValueError("the prompt is empty: give generate at least one token (e.g. the BOS token)")
    chunk_size = generation_config.prefill_chunk_size or cache.lsa_config.prefill_chunk_size
    if chunk_size is not None and generation_config.prefill_chunk_size is None:
        generation_config = copy.copy(generation_config)
        generation_config.prefill_chunk_size = chunk_size
    cache.begin_prefill(max(input_ids.shape[1] - cache.get_seq_length(), 0), chunk_size)
    try:
        return stock_prefill(self, input_ids, generation_config, model_kwargs, is_first_iteration)
    finally:
        cache.finish_prefill()


def enable_bounded_prefill(model, enabled: bool = True) -> None:
    """Run this DeepSeek-V4 model's multi-token forwards with a stock cache (DynamicCache) through the bounded
    prefill of prefill.py too, so a long prompt fits without LSA: no (chunk x history) tensor, the same
    results up to float rounding (the attention sums in another order). An LSA cache always uses it."""
    require_deepseek_v4(model)
    for module in model.modules():
        if isinstance(module, v4.DeepseekV4Attention):
            setattr(module, _BOUNDED_PREFILL, enabled)


def apply_lsa_patch() -> None:
    """Route DeepSeek-V4 CSA attention layers through LSA when their cache is an OffloadedLookaheadCache, and let
    generate build that cache for cache_implementation="lsa". Safe to call more than once."""
    check_transformers_compatibility()
    for cls, name, patched in _PATCHES:
        if getattr(cls.__dict__.get(name), _ORIGINAL, None) is None:
            setattr(patched, _ORIGINAL, cls.__dict__.get(name, getattr(cls, name)))
            setattr(cls, name, patched)
    if CACHE_IMPLEMENTATION not in generation_config_module.ALL_CACHE_IMPLEMENTATIONS:
        generation_config_module.ALL_CACHE_IMPLEMENTATIONS += (CACHE_IMPLEMENTATION,)


def remove_lsa_patch() -> None:
    """Restore the stock classes and unregister cache_implementation="lsa"."""
    for cls, name, patched in _PATCHES:
        original = getattr(cls.__dict__.get(name), _ORIGINAL, None)
        if original is not None:
            setattr(cls, name, original)
            delattr(patched, _ORIGINAL)
    generation_config_module.ALL_CACHE_IMPLEMENTATIONS = tuple(
        name for name in generation_config_module.ALL_CACHE_IMPLEMENTATIONS if name != CACHE_IMPLEMENTATION
    )


def is_patched() -> bool:
    return getattr(v4.DeepseekV4Attention.__dict__.get("forward"), _ORIGINAL, None) is not None


_PATCHES = (
    (v4.DeepseekV4Attention, "forward", _patched_attention_forward),
    (v4.DeepseekV4ForCausalLM, "forward", _patched_causal_lm_forward),
    (GenerationMixin, "_prepare_generation_config", _patched_prepare_generation_config),
    (GenerationMixin, "_prepare_cache_for_generation", _patched_prepare_cache),
    (GenerationMixin, "_prefill", _patched_prefill),
)
