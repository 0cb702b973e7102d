"""A tiny DeepSeek-V4 built in code: the offline default for the demo, the tests and the CPU evaluation.

It keeps every structural feature of the real backbone (sliding, CSA and HCA layers, the Lightning Indexer,
hyper-connections, hash and routed MoE, YaRN on the compressed branch) at sizes a CPU runs in seconds.
The index top-k is small so that the native indexer really has to choose among compressed entries.
"""

import torch
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
CHARACTERS = tuple(chr(code) for code in range(32, 127))
TINY_VOCAB_SIZE = len(SPECIAL_TOKENS) + len(CHARACTERS)

TINY_LAYER_TYPES = (
    "sliding_attention",
    "sliding_attention",
    "compressed_sparse_attention",
    "heavily_compressed_attention",
    "compressed_sparse_attention",
    "heavily_compressed_attention",
    "compressed_sparse_attention",
    "compressed_sparse_attention",
)


def deepseek_v4_config(
    layer_types=TINY_LAYER_TYPES,
    main_rotary_factor: float | None = None,
    compress_rotary_factor: float | None = None,
    **settings,
) -> DeepseekV4Config:
    """A small DeepSeek-V4 config on the tiny layer schedule, the one builder of the tiny model and the evaluation
    backbone: what they share (one KV head, 4 routed experts with 2 a token and 1 shared, 3 Sinkhorn steps, YaRN
    on the compressed branch) is set here; `settings` give the sizes and override any of it. A rotary factor,
    when given, is the fraction of head dims that branch's RoPE rotates (None: transformers' default)."""
    layer_types = list(layer_types)
    shared = dict(
        num_hidden_layers=len(layer_types),
        layer_types=layer_types,
        num_key_value_heads=1,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        hc_sinkhorn_iters=3,
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048},
    )
    config = DeepseekV4Config(**{**shared, **settings})
    for branch, factor in (("main", main_rotary_factor), ("compress", compress_rotary_factor)):
        if factor is not None:
            config.rope_parameters[branch]["partial_rotary_factor"] = factor
    return config


def tiny_deepseek_v4_config(**overrides) -> DeepseekV4Config:
    """A DeepSeek-V4 config with four CSA layers (2, 4, 6, 7), two HCA layers and two sliding-only layers."""
    settings = dict(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=64,
        moe_intermediate_size=32,
        num_attention_heads=4,
        head_dim=32,
        q_lora_rank=32,
        o_groups=2,
        o_lora_rank=16,
        index_n_heads=16,  # enough heads that an all-zero relu score (an exact tie in the top-k) is rare
        index_head_dim=16,
        index_topk=6,
        sliding_window=16,
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 16},
        hc_mult=2,
        initializer_range=0.2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return deepseek_v4_config(**{**settings, **overrides})


def tiny_deepseek_v4(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> DeepseekV4ForCausalLM:
    """A randomly initialized tiny DeepSeek-V4 in eval mode; the seed fixes its weights."""
    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(tiny_deepseek_v4_config(**overrides)).to(dtype)
    _randomize_zero_initialized(model, seed)
    return model.eval()


def _randomize_zero_initialized(model: DeepseekV4ForCausalLM, seed: int) -> None:
    """Give sinks and compressor position biases random values: at zero they would hide bugs in those paths."""
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("sinks") or name.endswith("position_bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def tiny_tokenizer():
    """A character-level tokenizer made in code (printable ASCII), so pipelines run offline."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>", padding_side="left"
    )
