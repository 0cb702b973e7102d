"""Wiring memory indexers to backbones: attach one to a loaded model, or load both from the indexer's repo."""

import torch
from transformers import AutoModelForCausalLM

from .layout import require_deepseek_v4
from .indexer import ATTACHED_INDEXER_ATTRIBUTE, MemoryIndexerConfig, MemoryIndexerModel, attached_memory_indexer
from .locate import locate_pretrained

# The from_pretrained options that also say where to look for a name; the others only matter once it is found.
_LOCATE_OPTIONS = ("token", "revision", "cache_dir", "local_files_only")


def attach_memory_indexer(model, indexer_or_path, **from_pretrained_kwargs) -> MemoryIndexerModel:
    """Attach a memory indexer (a MemoryIndexerModel, a Hub repo id or a local dir) to a DeepSeek-V4 model.

    The indexer must have been made for this backbone (same dimensions and CSA layers). Each target layer's
    indexer is placed on the device of that backbone layer, in the backbone's dtype. The indexer is kept
    beside the model, not inside it, so the backbone's own save_pretrained is unchanged.
    """
    require_deepseek_v4(model)
    if isinstance(indexer_or_path, MemoryIndexerModel):
        indexer = indexer_or_path
    elif isinstance(indexer_or_path, (str, bytes)) or hasattr(indexer_or_path, "__fspath__"):
        location = _locate(indexer_or_path, from_pretrained_kwargs)
        indexer = MemoryIndexerModel.from_pretrained(location, **from_pretrained_kwargs)
    else:
        raise TypeError(
            f"attach_memory_indexer takes a MemoryIndexerModel, a Hub repo id or a local directory; "
            f"got {type(indexer_or_path).__name__}"
        )
    indexer.config.check_compatible(model.config)
    dtype = model.dtype
    for layer, module in indexer.indexers.items():
        device = next(model.model.layers[int(layer)].parameters()).device
        module.to(device=device, dtype=dtype)
    indexer.rotary_emb.to(next(model.parameters()).device)
    indexer.eval()
    object.__setattr__(model, ATTACHED_INDEXER_ATTRIBUTE, indexer)
    return indexer


def detach_memory_indexer(model) -> MemoryIndexerModel | None:
    """Remove and return the attached memory indexer, if any."""
    indexer = attached_memory_indexer(model)
    if indexer is not None:
        object.__delattr__(model, ATTACHED_INDEXER_ATTRIBUTE)
    return indexer


class AutoLSAModelForCausalLM:
    """Load a DeepSeek-V4 backbone and its memory indexer from the indexer's repo, like PEFT's AutoPeftModel."""

    def __init__(self):
        raise OSError("use AutoLSAModelForCausalLM.from_pretrained(indexer_path, ...)")

    @classmethod
    def from_pretrained(cls, indexer_path, base_model=None, indexer_kwargs: dict | None = None, **model_kwargs):
        """indexer_path: the indexer's Hub repo id or local dir. base_model: a loaded model, a repo id or a
        dir; None loads the backbone named in the indexer config. model_kwargs go to the backbone's
        from_pretrained (dtype, device_map, ...)."""
        indexer_kwargs = dict(indexer_kwargs or {})
        indexer_path = _locate(indexer_path, indexer_kwargs)
        config = MemoryIndexerConfig.from_pretrained(indexer_path, **indexer_kwargs)
        if base_model is None:
            backbone = _named_backbone(indexer_path, config.base_model_name_or_path, model_kwargs)
            model = AutoModelForCausalLM.from_pretrained(backbone, **model_kwargs)
        elif isinstance(base_model, torch.nn.Module):
            model = base_model
        else:
            model = AutoModelForCausalLM.from_pretrained(_locate(base_model, model_kwargs), **model_kwargs)
        attach_memory_indexer(model, MemoryIndexerModel.from_pretrained(indexer_path, **indexer_kwargs))
        return model


def _locate(name_or_path, from_pretrained_kwargs: dict) -> str:
    options = {key: from_pretrained_kwargs[key] for key in _LOCATE_OPTIONS if key in from_pretrained_kwargs}
    return locate_pretrained(name_or_path, **options)


def _named_backbone(indexer_path: str, name: str | None, model_kwargs: dict) -> str:
    """The backbone recorded in the indexer config, located; an indexer of a model made in code has none."""
    if not name:
        raise ValueError(
            f"the indexer at {indexer_path} does not name its backbone (base_model_name_or_path): pass base_model="
        )
    try:
        return _locate(name, model_kwargs)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"the indexer at {indexer_path} names its backbone {name!r}, which cannot be loaded ({error}): "
            "pass base_model= with the model or where it is"
        ) from None
