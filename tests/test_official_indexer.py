"""The paper's released memory indexer (libertywing/FlashMemory-Deepseek-V4, MIT) loads as a MemoryIndexerModel.

The release's checkpoints are not downloaded: `release_checkpoint` writes one in the release's exact format (key
names, fp32 weights, complex64 RoPE tables) at reduced sizes, and `release_scores` is the release's score as its
training/train.py computes it, written here independently of indexer.py: YaRN table, RoPE as a complex product,
Hadamard on q and on the stored keys.
"""

import math

import pytest
import torch
from safetensors.torch import save_file
from transformers import DeepseekV4Config

import fm_transformers as fm
from fm_indexer import PAPER_CSA_ORDINALS_HELP, main
from fm_transformers.indexer import PAPER_TARGET_CSA_ORDINALS, default_target_layers
from fm_transformers.layout import csa_layers
from fm_transformers.tiny import tiny_deepseek_v4, tiny_deepseek_v4_config

SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
# V4-Flash: 43 layers, CSA on the even ones from 2 (the release's CSA_LAYER_IDS), HCA on the odd ones from 3.
FLASH_LAYER_TYPES = [SLIDING, SLIDING] + [CSA if layer % 2 == 0 else HCA for layer in range(2, 43)]
FLASH_COMPRESS_YARN = {
    "rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 65536, "beta_fast": 32.0, "beta_slow": 1.0
}
HEADS, RANK = 8, 24
# The tiny model's compress rotary at half of the 16 index dims, as V4-Flash's at 64 of 128.
TINY = dict(compress_rotary_factor=0.25)


def flash_config(**overrides) -> DeepseekV4Config:
    """DeepSeek-V4-Flash's layout and sizes (DeepseekV4Config's defaults are V4-Flash's: hidden 4096, ...)."""
    settings = dict(num_hidden_layers=43, layer_types=FLASH_LAYER_TYPES, rope_parameters=dict(FLASH_COMPRESS_YARN))
    return DeepseekV4Config(**{**settings, **overrides})


def release_checkpoint(config, ordinals=(1, 3), heads=HEADS, rank=RANK, seed=0, device=None) -> dict:
    """A state dict as the release's torch.save writes it: retrievers.l<CSA ordinal>.*, fp32, and the RoPE table."""
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape, std):
        if device == "meta":
            return torch.empty(shape, device="meta")
        return torch.randn(shape, generator=generator) * std

    hidden, head_dim = config.hidden_size, config.index_head_dim
    rope_dim = int(config.head_dim * config.rope_parameters["compress"]["partial_rotary_factor"])
    state = {}
    for ordinal in ordinals:
        prefix = f"retrievers.l{ordinal}."
        state[prefix + "wq_a.weight"] = normal(rank, hidden, std=hidden**-0.5)
        state[prefix + "q_norm_weight"] = 1 + normal(rank, std=0.1)
        state[prefix + "wq_b.weight"] = normal(heads * head_dim, rank, std=rank**-0.5)
        state[prefix + "weights_proj.weight"] = normal(heads, hidden, std=4 * hidden**-0.5)
        state[prefix + "freqs_cis"] = torch.polar(torch.ones(64, rope_dim // 2), torch.zeros(64, rope_dim // 2))
    return state


# --- the release's score, from its training/train.py and utils.py ---


def release_yarn_frequencies(config) -> torch.Tensor:
    """utils.precompute_freqs_cis's YaRN frequencies for the compress rotary of `config` (rope_dim / 2,)."""
    rope = config.rope_parameters["compress"]
    dim = int(config.head_dim * rope["partial_rotary_factor"])
    base, factor, original = rope["rope_theta"], rope["factor"], rope["original_max_position_embeddings"]

    def correction(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction(rope.get("beta_fast", 32.0))), 0)
    high = min(math.ceil(correction(rope.get("beta_slow", 1.0))), dim // 2 - 1)
    frequencies = 1.0 / base ** (torch.arange(0, dim, 2).float() / dim)
    ramp = ((torch.arange(dim // 2).float() - low) / max(high - low, 1)).clamp(0, 1)
    return frequencies * (1 - ramp) + frequencies / factor * ramp


def hadamard(dim: int) -> torch.Tensor:
    """The normalized Sylvester Hadamard matrix, which the release's hadamard_transform multiplies by."""
    matrix = torch.ones(1, 1)
    while matrix.shape[0] < dim:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return matrix / math.sqrt(dim)


def release_query(weights: dict, x: torch.Tensor, positions: torch.Tensor, config, eps: float = 1e-6):
    """Hadamard(RoPE(wq_b(RMSNorm(wq_a(x))))) per head, and the head weights; x (n, hidden), positions (n,)."""
    heads, head_dim = weights["weights_proj.weight"].shape[0], config.index_head_dim
    lora = x @ weights["wq_a.weight"].T
    lora = lora / torch.sqrt(lora.pow(2).mean(-1, keepdim=True) + eps) * weights["q_norm_weight"]
    q = (lora @ weights["wq_b.weight"].T).view(-1, heads, head_dim)
    frequencies = release_yarn_frequencies(config)
    rope_dim = 2 * frequencies.numel()
    rotation = torch.polar(torch.ones(len(positions), rope_dim // 2), torch.outer(positions.float(), frequencies))
    pairs = torch.view_as_complex(q[..., -rope_dim:].reshape(*q.shape[:-1], rope_dim // 2, 2).contiguous())
    rotated = torch.view_as_real(pairs * rotation[:, None]).flatten(-2)
    q = torch.cat([q[..., :-rope_dim], rotated], dim=-1) @ hadamard(head_dim).T
    w = (x @ weights["weights_proj.weight"].T) * head_dim**-0.5 * heads**-0.5
    return q, w


def release_scores(weights: dict, x, positions, stored_keys, config) -> torch.Tensor:
    """sigmoid(sum_h relu(k . q_h) * w_h) against keys as the release's server stores them (rotated); (n, chunks)."""
    q, w = release_query(weights, x, positions, config)
    return torch.sigmoid((torch.relu(torch.einsum("cd,nhd->nch", stored_keys, q)) * w[:, None]).sum(-1))


def fp8_per_entry(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The release's key storage: float8_e4m3fn values and one fp32 scale per entry (its act_quant, block = entry)."""
    scale = keys.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 448.0
    return (keys / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn), scale


def layer_weights(state: dict, ordinal: int) -> dict:
    prefix = f"retrievers.l{ordinal}."
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


@pytest.fixture(scope="module")
def tiny_config():
    return tiny_deepseek_v4_config(**TINY)


@pytest.fixture(scope="module")
def queries(tiny_config):
    """Hidden states at absolute positions past YaRN's original length, and transformers-style (unrotated) keys."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(5, tiny_config.hidden_size, generator=generator)
    positions = torch.tensor([40, 2047, 2500, 5000, 8000])
    keys = torch.randn(30, tiny_config.index_head_dim, generator=generator)
    return x, positions, keys


# --- numbering: CSA ordinals vs model layer indices ---


def test_paper_defaults_are_csa_ordinals_10_12_20_that_is_layers_22_26_42_of_v4_flash():
    assert csa_layers(flash_config())[::10] == [2, 22, 42]
    indexer = fm.MemoryIndexerModel.from_backbone(flash_config(hidden_size=64), num_heads=1, rank=4)
    assert indexer.config.layers == [22, 26, 42]
    assert PAPER_CSA_ORDINALS_HELP == " ".join(map(str, PAPER_TARGET_CSA_ORDINALS))


def test_a_backbone_with_fewer_csa_layers_gets_the_same_relative_depths():
    # the tiny model's CSA layers 2, 4, 6, 7: ordinals 10, 12, 20 of 0-20 land on ordinals 2, 2, 3 of 0-3
    assert default_target_layers(tiny_deepseek_v4_config()) == [6, 7]


def test_checkpoint_ordinals_are_mapped_to_model_layers(tiny_config):
    indexer = fm.MemoryIndexerModel.from_official(release_checkpoint(tiny_config, ordinals=(0, 3)), tiny_config)
    assert indexer.config.layers == [2, 7] and (indexer.config.num_heads, indexer.config.rank) == (HEADS, RANK)


def test_a_v4_flash_release_checkpoint_fits_v4_flash_on_the_meta_device():
    state = release_checkpoint(flash_config(), ordinals=PAPER_TARGET_CSA_ORDINALS, heads=128, rank=2048, device="meta")
    with torch.device("meta"):
        indexer = fm.MemoryIndexerModel.from_official(state, flash_config())
    assert indexer.config.layers == [22, 26, 42] and indexer.config.tau == 64
    shapes = {name: tuple(tensor.shape) for name, tensor in indexer.state_dict().items() if name.startswith("indexers.22.")}
    assert shapes == {
        "indexers.22.down_proj.weight": (2048, 4096),
        "indexers.22.q_norm.weight": (2048,),
        "indexers.22.up_proj.weight": (128 * 128, 2048),
        "indexers.22.weights_proj.weight": (128, 4096),
    }


def test_v4_flash_compress_rotary_is_the_release_yarn_table():
    indexer = fm.MemoryIndexerModel.from_backbone(flash_config(hidden_size=64), num_heads=1, rank=4)
    expected = release_yarn_frequencies(flash_config())
    torch.testing.assert_close(indexer.rotary_emb.compress_inv_freq, expected, rtol=1e-6, atol=0)
    assert indexer.rotary_emb.compress_attention_scaling == 1.0  # the release's table has no YaRN magnitude scaling


# --- scores ---


def test_scores_equal_the_release_formula_with_its_hadamard_on_q_and_keys(tiny_config, queries, tmp_path):
    """The release rotates q and the stored keys by H; the converted indexer rotates neither (H^T H = I)."""
    state = release_checkpoint(tiny_config)
    torch.save(state, tmp_path / "top3_R930_joint.pt")
    indexer = fm.MemoryIndexerModel.from_official(tmp_path / "top3_R930_joint.pt", tiny_config)
    x, positions, keys = queries
    rotated_keys = keys @ hadamard(tiny_config.index_head_dim).T
    for ordinal, layer in ((1, 4), (3, 7)):
        expected = release_scores(layer_weights(state, ordinal), x, positions, rotated_keys, tiny_config)
        assert expected.std() > 0.1  # scores spread over (0, 1), not saturated: the comparison means something
        actual = indexer.scores(layer, x[None], positions[None], keys[None])[0]
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_scores_match_the_release_with_fp8_keys_within_fp8_rounding(tiny_config, queries):
    """e4m3 keeps 3 mantissa bits: each stored key element is off by at most 2^-4 of itself (normal numbers) or
    2^-10 scales (subnormal ones); through relu (1-Lipschitz), the head weights and the sigmoid (slope <= 1/4)
    that bounds each score's error."""
    state = release_checkpoint(tiny_config)
    indexer = fm.MemoryIndexerModel.from_official(state, tiny_config)
    x, positions, keys = queries
    rotated_keys = keys @ hadamard(tiny_config.index_head_dim).T
    values, scale = fp8_per_entry(rotated_keys)
    weights = layer_weights(state, 3)
    expected = release_scores(weights, x, positions, values.float() * scale, tiny_config)
    q, w = release_query(weights, x, positions, tiny_config)
    key_error = 2**-4 * rotated_keys.abs() + 2**-10 * scale
    bound = 0.25 * torch.einsum("nh,nhd,cd->nc", w.abs(), q.abs(), key_error) + 1e-5
    actual = indexer.scores(7, x[None], positions[None], keys[None])[0]
    assert ((actual - expected).abs() <= bound).all()
    assert (actual - expected).abs().max() > 1e-5  # the keys really went through FP8


def test_a_safetensors_checkpoint_loads_as_the_torch_one(tiny_config, tmp_path):
    state = {key: value for key, value in release_checkpoint(tiny_config).items() if not key.endswith("freqs_cis")}
    save_file(state, tmp_path / "indexer.safetensors")
    from_pt = fm.MemoryIndexerModel.from_official(state, tiny_config)
    from_safetensors = fm.MemoryIndexerModel.from_official(str(tmp_path / "indexer.safetensors"), tiny_config)
    for name, tensor in from_pt.state_dict().items():
        assert torch.equal(from_safetensors.state_dict()[name], tensor)


def test_a_directory_in_the_release_layout_loads_its_default_checkpoint(tiny_config, tmp_path):
    (tmp_path / "release" / "checkpoints").mkdir(parents=True)
    torch.save(release_checkpoint(tiny_config), tmp_path / "release" / "checkpoints" / "top3_R930_joint.pt")
    assert fm.MemoryIndexerModel.from_official(str(tmp_path / "release"), tiny_config).config.layers == [4, 7]


# --- what is refused, in one line ---


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda state: state.pop("retrievers.l3.wq_b.weight"),
            r"^the checkpoint lacks retrievers\.l3\.wq_b\.weight: it is incomplete",
        ),
        (
            lambda state: state.update({"retrievers.l3.bias": torch.zeros(3)}),
            r"^unknown key\(s\) retrievers\.l3\.bias in the checkpoint",
        ),
        (lambda state: state.update({"optimizer": torch.zeros(3)}), r"^unknown key\(s\) optimizer in the checkpoint"),
        (lambda state: state.update({f"retrievers.l4.{name}": value for name, value in layer_weights(state, 3).items()}),
         r"^the checkpoint has retrievers\.l<N> for CSA ordinals \[4\], the backbone has 4 CSA layers \(ordinals 0-3\)"),
    ],
)
def test_a_checkpoint_that_does_not_fit_is_refused(tiny_config, edit, message):
    state = release_checkpoint(tiny_config)
    edit(state)
    with pytest.raises(ValueError, match=message):
        fm.MemoryIndexerModel.from_official(state, tiny_config)


def test_a_checkpoint_for_another_hidden_size_is_refused(tiny_config):
    state = release_checkpoint(tiny_deepseek_v4_config(hidden_size=48))
    with pytest.raises(ValueError, match=r"^retrievers\.l1\.wq_a\.weight reads hidden size 48, the backbone's hidden_size is 64"):
        fm.MemoryIndexerModel.from_official(state, tiny_config)


def test_a_checkpoint_for_another_index_head_dim_is_refused(tiny_config):
    state = release_checkpoint(tiny_deepseek_v4_config(index_head_dim=32))
    with pytest.raises(ValueError, match=r"^retrievers\.l1\.wq_b\.weight has 256 rows, 8 heads x the backbone's index_head_dim 16"):
        fm.MemoryIndexerModel.from_official(state, tiny_config)


# --- fm-indexer convert ---


def test_convert_writes_an_indexer_that_auto_lsa_model_loads_with_its_backbone(tiny_config, queries, tmp_path):
    backbone = tiny_deepseek_v4(seed=0, **TINY)
    backbone.save_pretrained(tmp_path / "backbone")
    state = release_checkpoint(tiny_config)
    torch.save(state, tmp_path / "top3_R930_joint.pt")
    command = ["convert", "--official-checkpoint", str(tmp_path / "top3_R930_joint.pt")]
    assert main([*command, "--backbone", str(tmp_path / "backbone"), "--output", str(tmp_path / "indexer")]) == 0

    card = (tmp_path / "indexer" / "README.md").read_text()
    assert "\nlicense: mit\n" in card and "libertywing/FlashMemory-Deepseek-V4" in card and "$" not in card
    model = fm.AutoLSAModelForCausalLM.from_pretrained(str(tmp_path / "indexer"))
    x, positions, keys = queries
    expected = fm.MemoryIndexerModel.from_official(state, tiny_config).scores(7, x[None], positions[None], keys[None])
    assert torch.equal(fm.attached_memory_indexer(model).scores(7, x[None], positions[None], keys[None]), expected)
    tokens = model.generate(torch.randint(4, 90, (1, 40)), max_new_tokens=3, cache_implementation="lsa", pad_token_id=0)
    assert tokens.shape == (1, 43)


def test_convert_for_the_tiny_backbone_attaches_to_it(tiny_config, tmp_path):
    torch.save(release_checkpoint(tiny_config), tmp_path / "indexer.pt")
    command = ["convert", "--official-checkpoint", str(tmp_path / "indexer.pt"), "--backbone", "tiny"]
    assert main([*command, "--output", str(tmp_path / "indexer")]) == 0
    model = tiny_deepseek_v4(seed=0)
    assert fm.attach_memory_indexer(model, str(tmp_path / "indexer")).config.layers == [4, 7]


def test_push_after_convert_keeps_the_release_card(tiny_config, tmp_path):
    """A converted release pushed on keeps its card (source, MIT licence), not the training card of this project."""
    torch.save(release_checkpoint(tiny_config), tmp_path / "indexer.pt")
    command = ["convert", "--official-checkpoint", str(tmp_path / "indexer.pt"), "--backbone", "tiny"]
    assert main([*command, "--output", str(tmp_path / "indexer")]) == 0
    assert main(["push", "--indexer", str(tmp_path / "indexer"), "--repo-id", "me/flashmemory", "--local-dir", str(tmp_path / "repo")]) == 0
    card = (tmp_path / "repo" / "README.md").read_text()
    assert card == (tmp_path / "indexer" / "README.md").read_text()
    assert "\nlicense: mit\n" in card and (tmp_path / "repo" / "conversion.json").is_file()
