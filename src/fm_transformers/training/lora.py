"""Adapting an existing memory indexer with LoRA (through PEFT) instead of training it from scratch.

Useful when a released indexer meets a shifted domain: only low-rank updates of its three projections train,
and the merged result is again a plain MemoryIndexerModel, loadable without PEFT.
"""

LORA_TARGETS = ("down_proj", "up_proj", "weights_proj")


def add_lora(model, r: int, alpha: float | None = None, dropout: float = 0.0):
    """Wrap `model` (a MemoryIndexerModel) so that only LoRA matrices of rank `r` train; alpha defaults to 2r."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise ImportError("--lora-r needs PEFT: pip install 'fm-transformers[train]' (or pip install peft)") from error
    if r < 1:
        raise ValueError(f"the LoRA rank must be at least 1, got {r}")
    config = LoraConfig(r=r, lora_alpha=alpha or 2 * r, lora_dropout=dropout, target_modules=list(LORA_TARGETS))
    return get_peft_model(model, config)


def merge_lora(model):
    """The plain MemoryIndexerModel with the LoRA updates folded into its weights."""
    return model.merge_and_unload()


def is_lora(model) -> bool:
    return hasattr(model, "merge_and_unload") and hasattr(model, "peft_config")
