"""The tiny model and the evaluation backbone come from one config builder: same layer schedule and shared
structure, each with its own sizes."""

from fm_transformers.eval import eval_backbone_config
from fm_transformers.eval.vocab import VOCAB_SIZE
from fm_transformers.tiny import TINY_LAYER_TYPES, TINY_VOCAB_SIZE, tiny_deepseek_v4_config

SHARED = dict(
    num_hidden_layers=8,
    layer_types=list(TINY_LAYER_TYPES),
    num_key_value_heads=1,
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_shared_experts=1,
    hc_sinkhorn_iters=3,
    max_position_embeddings=8192,
)


def fields(config, names):
    return {name: getattr(config, name) for name in names}


def test_the_tiny_config_keeps_its_sizes_and_transformers_default_rotary_fractions():
    config = tiny_deepseek_v4_config()
    assert fields(config, SHARED) == SHARED
    sizes = dict(vocab_size=TINY_VOCAB_SIZE, hidden_size=64, head_dim=32, index_n_heads=16, index_topk=6, hc_mult=2)
    assert fields(config, sizes) == sizes
    assert config.compress_rates == {"compressed_sparse_attention": 4, "heavily_compressed_attention": 16}
    assert config.initializer_range == 0.2
    assert config.rope_parameters["main"]["partial_rotary_factor"] == 0.125
    assert config.rope_parameters["compress"]["partial_rotary_factor"] == 0.125
    assert config.rope_parameters["compress"]["rope_type"] == "yarn"


def test_the_evaluation_backbones_share_the_schedule_and_rotate_every_sliding_head_dim():
    for size, (hidden, compress_rotary, hca_rate) in {"small": (256, 0.25, 128), "smoke": (32, 1.0, 16)}.items():
        config = eval_backbone_config(size)
        assert fields(config, SHARED) == SHARED
        assert (config.vocab_size, config.hidden_size, config.hc_mult) == (VOCAB_SIZE, hidden, 1)
        assert config.compress_rates == {"compressed_sparse_attention": 4, "heavily_compressed_attention": hca_rate}
        assert config.initializer_range == 0.02
        assert config.rope_parameters["main"]["partial_rotary_factor"] == 1.0
        assert config.rope_parameters["compress"]["partial_rotary_factor"] == compress_rotary
        assert config.rope_parameters["compress"]["rope_type"] == "yarn"


def test_overrides_reach_the_config_and_a_layer_schedule_sets_the_layer_count():
    config = tiny_deepseek_v4_config(layer_types=["sliding_attention", "compressed_sparse_attention"], hidden_size=32)
    assert (config.num_hidden_layers, config.hidden_size) == (2, 32)
    smoke = eval_backbone_config("smoke", compress_rotary_factor=0.5)
    assert smoke.rope_parameters["compress"]["partial_rotary_factor"] == 0.5
