"""Which layers of a DeepSeek-V4 backbone are what: the one place that reads `layer_types` and `compress_rates`.

Every module that needs the CSA layers or their compress rate asks here, so a config field renamed upstream
is fixed once. Accepts a transformers config or the plain dict a memory-indexer config records.
"""

CSA_LAYER_TYPE = "compressed_sparse_attention"
HCA_LAYER_TYPE = "heavily_compressed_attention"
SLIDING_LAYER_TYPE = "sliding_attention"


def _field(config, name: str):
    return config[name] if isinstance(config, dict) else getattr(config, name)


def csa_layers(config) -> list[int]:
    """Model layer indices of the CSA layers, in order."""
    return [index for index, kind in enumerate(_field(config, "layer_types")) if kind == CSA_LAYER_TYPE]


def csa_compress_rate(config) -> int:
    """Source tokens per compressed CSA entry (a chunk); 4 in DeepSeek-V4."""
    return _field(config, "compress_rates")[CSA_LAYER_TYPE]


def csa_chunks_of_spans(spans, compress_rate: int) -> list[int]:
    """The compressed CSA entries (chunks) that pool any token of the (start, stop) position spans, ascending. V4's
    compressor pools entry w from window w's tokens and window w - 1's (overlapping windows of 2 x rate tokens, a
    stride of rate), so token p lies in entries p // rate and p // rate + 1: keeping only the first loses a span's
    last tokens."""
    return sorted({c for start, stop in spans for c in range(start // compress_rate, (stop - 1) // compress_rate + 2)})


def require_deepseek_v4(model) -> None:
    """Raise a clear error unless `model` is a transformers DeepSeek-V4 model."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type != "deepseek_v4":
        raise ValueError(
            f"Lookahead Sparse Attention works with DeepSeek-V4 models only; got {type(model).__name__} "
            f"(model_type={model_type!r})"
        )
