"""The memory indexer (level 1 of LSA): one small scorer per target CSA layer, shipped as a Hub model.

Per target layer, from the hidden state h entering that layer's attention (REFERENCE.md section 2):
    q = RoPE(W_IUQ . RMSNorm(W_DQ . h))           (heads, head_dim), RoPE as the native indexer's
    w = W_w . h * head_dim^-0.5 * heads^-0.5       (heads,)
    I[t, s] = sigmoid(sum_h w[h] * relu(q[h] . K_idx[s]))
K_idx are the backbone's own frozen indexer keys, so the indexer only fits the backbone it was made for:
its config records that backbone's dimensions and `check_compatible` refuses any other.
"""

import math

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModel, DeepseekV4Config, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.deepseek_v4.modeling_deepseek_v4 import (
    DeepseekV4RMSNorm,
    DeepseekV4RotaryEmbedding,
    apply_rotary_pos_emb,
)

from .layout import csa_layers

# The paper's target layers as ORDINALS among the CSA layers (0 = the first CSA layer), as its release names them
# (`retrievers.l10`, ...): model layers 22, 26 and 42 of DeepSeek-V4-Flash, whose 21 CSA layers are 2, 4, ..., 42.
# `default_target_layers` turns them into model layer indices, which every other API takes.
PAPER_TARGET_CSA_ORDINALS = (10, 12, 20)
PAPER_CSA_LAYER_COUNT = 21  # DeepSeek-V4-Flash's

# The backbone fields the indexer depends on: sizes of what it reads, and the rotary it must reproduce.
BACKBONE_FIELDS = (
    "hidden_size",
    "head_dim",
    "index_head_dim",
    "num_hidden_layers",
    "layer_types",
    "compress_rates",
    "compress_rope_theta",
    "rope_parameters",
    "partial_rotary_factor",
    "max_position_embeddings",
    "rms_norm_eps",
)
# The fields that must match exactly for an indexer to attach.
BACKBONE_CHECKED_FIELDS = ("hidden_size", "index_head_dim", "num_hidden_layers", "layer_types", "compress_rates")


@strict
class MemoryIndexerConfig(PreTrainedConfig):
    r"""
    layers (`list[int]`): the backbone's CSA layers that carry a memory indexer, as model layer indices.
    num_heads (`int`): query heads per layer (128 in the release).
    rank (`int`): low-rank query dimension (2048 in the release).
    base_model_name_or_path (`str`): the backbone this indexer was made for (Hub id or local path).
    backbone (`dict`): the backbone dimensions the indexer depends on (see `BACKBONE_FIELDS`).
    tau (`int`): the lookahead its labels were made with (decode steps per window); None if unknown. An LSA cache
        with another `tau` warns: the indexer predicts the chunks of its own window length.
    """

    model_type = "fm_memory_indexer"

    layers: list[int] | None = None
    num_heads: int = 128
    rank: int = 2048
    base_model_name_or_path: str | None = None
    backbone: dict | None = None
    tau: int | None = None
    initializer_range: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.backbone["index_head_dim"]

    @property
    def hidden_size(self) -> int:
        return self.backbone["hidden_size"]

    def backbone_config(self) -> DeepseekV4Config:
        """A DeepseekV4Config with the recorded backbone dimensions (the rest at defaults)."""
        return DeepseekV4Config(**self.backbone)

    def check_compatible(self, backbone_config) -> None:
        """Raise a ValueError that says what differs if this indexer was not made for `backbone_config`."""
        if getattr(backbone_config, "model_type", None) != "deepseek_v4":
            raise ValueError(
                f"memory indexers work with DeepSeek-V4 backbones; got model_type="
                f"{getattr(backbone_config, 'model_type', None)!r}"
            )
        for field in BACKBONE_CHECKED_FIELDS:
            mine, theirs = self.backbone.get(field), getattr(backbone_config, field)
            if mine != theirs:
                raise ValueError(
                    f"indexer was made for {field}={_short(mine)} ({self.base_model_name_or_path or 'unnamed backbone'}), "
                    f"model has {field}={_short(theirs)}: load the indexer made for this backbone"
                )
        backbone_csa = csa_layers(backbone_config)
        wrong = [layer for layer in self.layers if layer not in backbone_csa]
        if wrong:
            raise ValueError(f"indexer layers {wrong} are not CSA layers of this backbone (CSA layers: {backbone_csa})")


def default_target_layers(backbone_config) -> list[int]:
    """Model layer indices of the paper's target layers on this backbone.

    With V4-Flash's 21 CSA layers: CSA ordinals 10, 12 and 20 (model layers 22, 26, 42 of V4-Flash). With n CSA
    layers the ordinals scale to the same relative depths, ordinal * (n - 1) / 20 rounded half up, so a smaller
    backbone gets fewer layers where two fall on one (the tiny model's CSA layers 2, 4, 6, 7 give 6 and 7).
    """
    backbone_csa = csa_layers(backbone_config)
    if not backbone_csa:
        raise ValueError("this backbone has no CSA layers (layer_types): a memory indexer needs at least one")
    scale = (len(backbone_csa) - 1) / (PAPER_CSA_LAYER_COUNT - 1)
    ordinals = sorted({math.floor(ordinal * scale + 0.5) for ordinal in PAPER_TARGET_CSA_ORDINALS})
    return [backbone_csa[ordinal] for ordinal in ordinals]


def _short(value) -> str:
    text = repr(value)
    return text if len(text) < 80 else text[:77] + "..."


class MemoryIndexer(nn.Module):
    """The memory indexer of one target layer: a query tower scored against frozen native indexer keys."""

    def __init__(self, config: MemoryIndexerConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.down_proj = nn.Linear(config.hidden_size, config.rank, bias=False)  # W_DQ
        self.q_norm = DeepseekV4RMSNorm(config.rank, eps=config.backbone["rms_norm_eps"])
        self.up_proj = nn.Linear(config.rank, config.num_heads * config.head_dim, bias=False)  # W_IUQ
        self.weights_proj = nn.Linear(config.hidden_size, config.num_heads, bias=False)  # W_w
        self.weights_scale = config.head_dim**-0.5 * config.num_heads**-0.5

    def query(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q (batch, queries, heads, head_dim) with RoPE and head weights (batch, queries, heads), in float32."""
        batch, queries, _ = hidden_states.shape
        q = self.up_proj(self.q_norm(self.down_proj(hidden_states)))
        q = q.view(batch, queries, self.num_heads, self.head_dim).transpose(1, 2)
        q = apply_rotary_pos_emb(q, cos, sin).transpose(1, 2).float()
        weights = self.weights_proj(hidden_states).float() * self.weights_scale
        return q, weights

    def forward(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor):
        """Logits (before the sigmoid) of every query against its keys.

        hidden_states: (batch, queries, hidden); cos/sin: the compress rotary at the query positions.
        keys: (batch, chunks, head_dim) shared by all queries, or (batch, queries, n, head_dim) per query.
        Returns (batch, queries, chunks) or (batch, queries, n), in float32.
        """
        q, weights = self.query(hidden_states, cos, sin)
        if keys.dim() == 3:
            dots = torch.einsum("bshd,btd->bsht", q, keys.float())
        else:
            dots = torch.einsum("bshd,bsnd->bshn", q, keys.float())
        return (F.relu(dots) * weights.unsqueeze(-1)).sum(dim=2)


class MemoryIndexerModel(PreTrainedModel):
    """One MemoryIndexer per target layer, saved and loaded like any transformers model."""

    config_class = MemoryIndexerConfig
    base_model_prefix = "memory_indexer"
    main_input_name = "hidden_states"
    _no_split_modules = ["MemoryIndexer"]

    def __init__(self, config: MemoryIndexerConfig):
        super().__init__(config)
        if not config.layers or not config.backbone:
            raise ValueError("MemoryIndexerConfig needs `layers` and `backbone`: build it with from_backbone()")
        self.indexers = nn.ModuleDict({str(layer): MemoryIndexer(config) for layer in config.layers})
        self.rotary_emb = DeepseekV4RotaryEmbedding(config.backbone_config())
        self.post_init()

    @classmethod
    def from_backbone(
        cls,
        model_or_config,
        layers: tuple[int, ...] | list[int] | None = None,
        num_heads: int = 128,
        rank: int = 2048,
        base_model_name_or_path: str | None = None,
    ) -> "MemoryIndexerModel":
        """A fresh, randomly initialized indexer that fits the given backbone (the trainer starts from it).

        layers: model layer indices of CSA layers; None takes `default_target_layers` (the paper's).
        """
        backbone_config = getattr(model_or_config, "config", model_or_config)
        if getattr(backbone_config, "model_type", None) != "deepseek_v4":
            raise ValueError(
                f"from_backbone needs a DeepSeek-V4 model or config; got "
                f"{type(model_or_config).__name__} with model_type={getattr(backbone_config, 'model_type', None)!r}"
            )
        if layers is None:
            layers = default_target_layers(backbone_config)
        layers = sorted(set(int(layer) for layer in layers))
        if base_model_name_or_path is None:
            base_model_name_or_path = getattr(backbone_config, "_name_or_path", None) or None
        config = MemoryIndexerConfig(
            layers=layers,
            num_heads=num_heads,
            rank=rank,
            base_model_name_or_path=base_model_name_or_path,
            backbone={field: _plain(getattr(backbone_config, field)) for field in BACKBONE_FIELDS},
        )
        config.check_compatible(backbone_config)
        return cls(config)

    @classmethod
    def from_native(cls, model, layers=None, num_heads: int | None = None) -> "MemoryIndexerModel":
        """An indexer whose every target layer starts as that layer's native indexer query tower: the attention's
        q_a_proj and q_a_norm (W_DQ and its norm, rank q_lora_rank), the native indexer's q_b_proj (W_IUQ) and
        weights_proj (W_w). Its logits for a token then equal the native indexer's scores for that token, so
        training starts from "what this token reads" rather than from noise. num_heads (default: the native
        index_n_heads) may add heads: random queries with zero head weights, so they add nothing until trained.

        model: the DeepSeek-V4 model with its weights; layers as in `from_backbone`.
        """
        config = model.config
        native_heads = config.index_n_heads
        num_heads = native_heads if num_heads is None else num_heads
        if num_heads < native_heads:
            raise ValueError(f"num_heads={num_heads}: a native start needs at least the {native_heads} native heads")
        indexer = cls.from_backbone(model, layers=layers, num_heads=num_heads, rank=config.q_lora_rank)
        width = native_heads * config.index_head_dim
        with torch.no_grad():
            for layer, tower in indexer.indexers.items():
                attention = model.model.layers[int(layer)].self_attn
                native = attention.compressor.indexer
                tower.down_proj.weight.copy_(attention.q_a_proj.weight)
                tower.q_norm.weight.copy_(attention.q_a_norm.weight)
                tower.up_proj.weight[:width].copy_(native.q_b_proj.weight)
                tower.weights_proj.weight.zero_()
                tower.weights_proj.weight[:native_heads].copy_(native.scorer.weights_proj.weight)
                # the native scale is index_head_dim^-0.5 * index_n_heads^-0.5; the tower's counts its own heads
                tower.weights_proj.weight.mul_(math.sqrt(num_heads / native_heads))
        return indexer.to(next(model.parameters()).device)

    @classmethod
    def from_official(cls, checkpoint, backbone, filename: str | None = None) -> "MemoryIndexerModel":
        """The memory indexer released with the paper (libertywing/FlashMemory-Deepseek-V4, MIT), checked against
        `backbone` (a DeepSeek-V4 model, config, Hub id or directory). `checkpoint`: a .pt/.pth/.safetensors file,
        a loaded state dict, or a directory / Hub repo in the release's layout (`filename` inside it, by default
        checkpoints/top3_R930_joint.pt). See fm_transformers.official for the format and the mapping."""
        from .official import load_official  # imported here: it loads safetensors and the Hub client

        return load_official(cls, checkpoint, backbone, filename)

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, DeepseekV4RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, DeepseekV4RotaryEmbedding):
            inv_freq, _ = module.compute_default_rope_parameters(module.config, layer_type="compress")
            rope_type = module.rope_type["compress"]
            if rope_type != "default":
                inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](module.config, layer_type="compress")
            init.copy_(module.compress_inv_freq, inv_freq)
            init.copy_(module.compress_original_inv_freq, inv_freq)

    def rotary(self, hidden_states: torch.Tensor, position_ids: torch.Tensor):
        """cos/sin of the compress rotary at `position_ids`, as the native indexer computes them."""
        return self.rotary_emb(hidden_states, position_ids=position_ids, layer_type="compress")

    def forward(self, layer: int, hidden_states: torch.Tensor, position_ids: torch.Tensor, keys: torch.Tensor):
        """Logits of the indexer of model layer `layer`: (batch, queries, chunks). `scores` applies the sigmoid."""
        indexer = self.indexers[str(layer)]
        cos, sin = self.rotary(hidden_states, position_ids)
        return indexer(hidden_states, cos, sin, keys)

    def query(self, layer: int, hidden_states: torch.Tensor, position_ids: torch.Tensor):
        """Layer `layer`'s query and head weights for level-1 scoring (see MemoryIndexer.query)."""
        cos, sin = self.rotary(hidden_states, position_ids)
        return self.indexers[str(layer)].query(hidden_states, cos, sin)

    def scores(self, layer: int, hidden_states: torch.Tensor, position_ids: torch.Tensor, keys: torch.Tensor):
        """I[t, s] in [0, 1]: the probability that chunk s is needed in the next tau steps."""
        return torch.sigmoid(self(layer, hidden_states, position_ids, keys))


ATTACHED_INDEXER_ATTRIBUTE = "_fm_memory_indexer"


def attached_memory_indexer(model) -> "MemoryIndexerModel | None":
    """The memory indexer attached to a backbone by `attach_memory_indexer`, or None."""
    return getattr(model, ATTACHED_INDEXER_ATTRIBUTE, None)


def _plain(value):
    """Config values as JSON-friendly builtins (lists, dicts), so they survive save/load unchanged."""
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


AutoConfig.register(MemoryIndexerConfig.model_type, MemoryIndexerConfig)
AutoModel.register(MemoryIndexerConfig, MemoryIndexerModel)
