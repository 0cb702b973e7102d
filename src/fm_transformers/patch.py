"""The one place that touches transformers: patch DeepSeek-V4's attention (CSA layers under an LSA cache)
and register `cache_implementation="lsa"` with generate.

The patch is idempotent and removable. Before patching it checks that the classes look the way this code
was written for (transformers 5.23), so an upgrade that changes them fails loudly instead of silently.
"""

import inspect

from transformers import GenerationMixin
from transformers.generation import configuration_utils as generation_config_module
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as v4

from .attention import lookahead_attention_forward
from .cache import OffloadedLookaheadCache, require_deepseek_v4
from .config import LSAConfig
from .indexer import CSA_LAYER_TYPE

CACHE_IMPLEMENTATION = "lsa"
_ORIGINAL = "_fm_lsa_original"

_EXPECTED_METHODS = {
    v4.DeepseekV4Attention: ("forward",),
    v4.DeepseekV4CSACompressor: ("forward",),
    v4.DeepseekV4Indexer: ("forward",),
    v4.DeepseekV4CSACache: ("store_compression_weights", "update_overlap_state", "update_compressor_states", "reorder_cache"),
    GenerationMixin: ("_prepare_cache_for_generation",),
}
# The stock attention forward is called with these arguments, and calls the compressor with these.
_EXPECTED_FORWARD_PARAMETERS = {
    v4.DeepseekV4Attention: ["self", "hidden_states", "position_embeddings", "position_ids", "attention_mask", "past_key_values", "kwargs"],
    v4.DeepseekV4CSACompressor: ["self", "hidden_states", "q_residual", "position_ids", "past_key_values", "layer_idx"],
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
    for cls, expected in _EXPECTED_FORWARD_PARAMETERS.items():
        parameters = list(inspect.signature(_original(cls, "forward")).parameters)
        if parameters != expected:
            raise RuntimeError(
                f"{cls.__name__}.forward takes {parameters}, fm_transformers was written for {expected}: "
                "install a transformers version fm_transformers supports"
            )
    if not isinstance(getattr(generation_config_module, "ALL_CACHE_IMPLEMENTATIONS", None), tuple):
        raise RuntimeError("transformers.generation.configuration_utils.ALL_CACHE_IMPLEMENTATIONS is missing")


def _original(cls, name):
    method = cls.__dict__.get(name) if name in cls.__dict__ else getattr(cls, name)
    return getattr(method, _ORIGINAL, method)


def _patched_attention_forward(self, hidden_states, position_embeddings, position_ids, attention_mask, past_key_values=None, **kwargs):
    stock_forward = _original(v4.DeepseekV4Attention, "forward")
    if isinstance(past_key_values, OffloadedLookaheadCache) and self.layer_type == CSA_LAYER_TYPE:
        return lookahead_attention_forward(
            self, stock_forward, hidden_states, position_embeddings, position_ids, attention_mask, past_key_values, **kwargs
        )
    return stock_forward(self, hidden_states, position_embeddings, position_ids, attention_mask, past_key_values, **kwargs)


def _patched_prepare_cache(self, generation_config, model_kwargs, *args, **kwargs):
    stock_prepare = _original(GenerationMixin, "_prepare_cache_for_generation")
    if generation_config.cache_implementation != CACHE_IMPLEMENTATION:
        return stock_prepare(self, generation_config, model_kwargs, *args, **kwargs)
    require_deepseek_v4(self)
    if model_kwargs.get("past_key_values") is not None:
        raise ValueError("pass either cache_implementation='lsa' or past_key_values, not both")
    if generation_config.use_cache is False:
        raise ValueError("cache_implementation='lsa' needs use_cache=True")
    model_kwargs["past_key_values"] = OffloadedLookaheadCache(self, LSAConfig.from_dict(generation_config.cache_config))


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
    (GenerationMixin, "_prepare_cache_for_generation", _patched_prepare_cache),
)
