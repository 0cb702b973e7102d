"""The memory indexer released with the paper (GitHub and Hub `libertywing/FlashMemory-Deepseek-V4`, MIT licence),
loaded as a MemoryIndexerModel.

The release ships no config, only a state dict (`checkpoints/top3_R930_joint.pt`, written by torch.save; a
safetensors file of the same keys loads too). Per target layer N it holds, under `retrievers.l{N}.`:
    wq_a.weight          (rank, hidden)                 -> down_proj.weight   (W_DQ)
    q_norm_weight        (rank,)                        -> q_norm.weight
    wq_b.weight          (heads * index_head_dim, rank) -> up_proj.weight     (W_IUQ), head-major as ours
    weights_proj.weight  (heads, hidden)                -> weights_proj.weight (W_w)
    freqs_cis            its RoPE table, ignored: the backbone's compress rotary gives the same angles
N is an ORDINAL among the backbone's CSA layers (the release's `CSA_LAYER_IDS[N]`): l10, l12, l20 are model layers
22, 26, 42 of DeepSeek-V4-Flash. Heads and rank are read off the shapes (128 and 2048 in the release).

The release's score (its training/train.py) is the formula of indexer.py term by term: fp32 RMSNorm, interleaved
YaRN RoPE on the trailing rotary slice of each head (transformers' compress rotary: same base, factor and layout,
no attention scaling), head weights scaled by head_dim^-0.5 * heads^-0.5, sigmoid of the relu-weighted sum. The
one difference is a Hadamard rotation of q and of the stored keys; `official_layout` says why it is dropped.
"""

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import EntryNotFoundError, HFValidationError
from safetensors.torch import load_file
from transformers import AutoConfig, PreTrainedConfig

from .layout import csa_layers
from .locate import locate_pretrained

OFFICIAL_REPO = "libertywing/FlashMemory-Deepseek-V4"
OFFICIAL_LICENSE = "MIT"
DEFAULT_CHECKPOINT_FILE = "checkpoints/top3_R930_joint.pt"
OFFICIAL_TAU = 64  # the release's label window and recall interval (training/train.py, launch_decode.sh)
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors")

_KEY = re.compile(r"retrievers\.l(\d+)\.(.+)")
_NAMES = {
    "wq_a.weight": "down_proj.weight",
    "q_norm_weight": "q_norm.weight",
    "wq_b.weight": "up_proj.weight",
    "weights_proj.weight": "weights_proj.weight",
}
_IGNORED = "freqs_cis"
_EXPECTED_KEYS = "retrievers.l<N>.{" + ", ".join(_NAMES) + "}"
_MADE_FOR = "convert it for the backbone it was made for (DeepSeek-V4-Flash)"


@dataclass(frozen=True)
class OfficialLayout:
    """What a release checkpoint means for one backbone: its layers as model layer indices, the sizes read off its
    weights, and its tensors under MemoryIndexerModel's names."""

    layers: list[int]
    num_heads: int
    rank: int
    state_dict: dict[str, torch.Tensor]


def load_official(model_class, checkpoint, backbone, filename: str | None = None):
    """See MemoryIndexerModel.from_official; `model_class` is MemoryIndexerModel (passed in: indexer.py imports this
    module, not the other way round)."""
    config, name = resolve_backbone(backbone)
    state_dict = checkpoint if isinstance(checkpoint, Mapping) else read_checkpoint(checkpoint, filename)
    layout = official_layout(state_dict, config)
    model = model_class.from_backbone(
        config, layers=layout.layers, num_heads=layout.num_heads, rank=layout.rank, base_model_name_or_path=name
    )
    model.config.tau = OFFICIAL_TAU
    model.load_state_dict(layout.state_dict)
    return model.eval()


def resolve_backbone(backbone) -> tuple[PreTrainedConfig, str | None]:
    """(config, name to record) of a DeepSeek-V4 model, config, Hub id or directory; only the config is loaded."""
    if isinstance(backbone, (str, os.PathLike)):
        name = locate_pretrained(backbone)
        config = AutoConfig.from_pretrained(name)
    else:
        config = getattr(backbone, "config", backbone)
        name = getattr(config, "_name_or_path", None) or None
    if getattr(config, "model_type", None) != "deepseek_v4":
        raise ValueError(
            f"the released memory indexer serves DeepSeek-V4-Flash; the backbone given has "
            f"model_type={getattr(config, 'model_type', None)!r}: pass a DeepSeek-V4 model, config, Hub id or directory"
        )
    return config, name


def read_checkpoint(checkpoint, filename: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict in a .pt/.pth file (torch.load with weights_only=True: no code runs) or a .safetensors file."""
    path = checkpoint_path(checkpoint, filename or DEFAULT_CHECKPOINT_FILE)
    if path.suffix == ".safetensors":
        return load_file(path)
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise ValueError(f"{path} is not a checkpoint the release writes: pass a .pt, .pth or .safetensors file")
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{path} holds a {type(state_dict).__name__}, not a state dict: pass the release's indexer")
    return dict(state_dict)


def checkpoint_path(checkpoint, filename: str) -> Path:
    """A local checkpoint file: `checkpoint` itself, `filename` inside its directory, or downloaded from its Hub
    repo (taken from the local Hugging Face cache when it is there, so offline works once it was fetched)."""
    name = os.fsdecode(checkpoint)
    path = Path(name).expanduser()
    if path.is_file():
        return path
    if name.endswith(CHECKPOINT_SUFFIXES):
        raise FileNotFoundError(f"no such file: {name}")
    if not path.is_dir():
        cached = _cached(name, filename)
        if cached is not None:
            return cached
    location = locate_pretrained(checkpoint)  # one-line errors for a missing directory or an unreachable repo
    if Path(location).is_dir():
        if not (Path(location) / filename).is_file():
            raise FileNotFoundError(f"{location} has no {filename}: pass the checkpoint file or its path inside {location}")
        return Path(location) / filename
    try:
        return Path(hf_hub_download(location, filename))
    except EntryNotFoundError:
        raise FileNotFoundError(f"the Hub repo {location} has no {filename}: pass the file's path inside it") from None


def _cached(repo_id: str, filename: str) -> Path | None:
    try:
        cached = try_to_load_from_cache(repo_id, filename)
    except HFValidationError:
        return None
    return Path(cached) if isinstance(cached, str) else None


def official_layout(state_dict: Mapping[str, torch.Tensor], backbone_config) -> OfficialLayout:
    """Check a release state dict against the backbone and rename it to MemoryIndexerModel's keys.

    The Hadamard is dropped here. The release multiplies q (after RoPE) by a normalized Hadamard matrix H, and its
    server stores the native index keys rotated by the same H. H is orthonormal, so (Hq) . (Hk) = q . k: scored
    against transformers' index keys, which are not rotated, the unrotated q gives the release's scores exactly.
    """
    by_ordinal = _weights_by_ordinal(state_dict)
    backbone_csa = csa_layers(backbone_config)
    beyond = sorted(ordinal for ordinal in by_ordinal if ordinal >= len(backbone_csa))
    if beyond:
        raise ValueError(
            f"the checkpoint has retrievers.l<N> for CSA ordinals {beyond}, the backbone has {len(backbone_csa)} CSA "
            f"layers (ordinals 0-{len(backbone_csa) - 1}): {_MADE_FOR}"
        )
    num_heads, rank = _check_shapes(by_ordinal, backbone_config)
    renamed = {
        f"indexers.{backbone_csa[ordinal]}.{_NAMES[name]}": tensor
        for ordinal, weights in by_ordinal.items()
        for name, tensor in weights.items()
    }
    return OfficialLayout(sorted(backbone_csa[ordinal] for ordinal in by_ordinal), num_heads, rank, renamed)


def _weights_by_ordinal(state_dict: Mapping[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    """{CSA ordinal: {release weight name: tensor}}; every key known, every layer complete, freqs_cis left out."""
    by_ordinal: dict[int, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in state_dict.items():
        match = _KEY.fullmatch(key)
        if match is None or match[2] not in (*_NAMES, _IGNORED):
            unknown.append(key)
        elif match[2] != _IGNORED:
            by_ordinal.setdefault(int(match[1]), {})[match[2]] = tensor
    if unknown:
        raise ValueError(
            f"unknown key(s) {_listed(unknown)} in the checkpoint: the release's memory indexer holds only "
            f"{_EXPECTED_KEYS}"
        )
    if not by_ordinal:
        raise ValueError(f"the checkpoint holds no memory indexer weights ({_EXPECTED_KEYS})")
    missing = [
        f"retrievers.l{ordinal}.{name}"
        for ordinal, weights in sorted(by_ordinal.items())
        for name in _NAMES
        if name not in weights
    ]
    if missing:
        raise ValueError(f"the checkpoint lacks {_listed(missing)}: it is incomplete or not the release's memory indexer")
    return by_ordinal


def _check_shapes(by_ordinal: dict[int, dict[str, torch.Tensor]], backbone_config) -> tuple[int, int]:
    """(heads, rank), read off the first layer's weights; every weight must fit them and the backbone."""
    hidden, head_dim = backbone_config.hidden_size, backbone_config.index_head_dim
    first = by_ordinal[min(by_ordinal)]
    num_heads, rank = first["weights_proj.weight"].shape[0], first["wq_a.weight"].shape[0]
    for ordinal, weights in sorted(by_ordinal.items()):
        prefix = f"retrievers.l{ordinal}."
        for name in ("wq_a.weight", "weights_proj.weight"):
            if weights[name].shape[-1] != hidden:
                raise ValueError(
                    f"{prefix}{name} reads hidden size {weights[name].shape[-1]}, the backbone's hidden_size is "
                    f"{hidden}: {_MADE_FOR}"
                )
        rows = weights["wq_b.weight"].shape[0]
        if rows != num_heads * head_dim:
            raise ValueError(
                f"{prefix}wq_b.weight has {rows} rows, {num_heads} heads x the backbone's index_head_dim {head_dim} "
                f"= {num_heads * head_dim}: {_MADE_FOR}"
            )
        expected = {
            "wq_a.weight": (rank, hidden),
            "q_norm_weight": (rank,),
            "wq_b.weight": (num_heads * head_dim, rank),
            "weights_proj.weight": (num_heads, hidden),
        }
        for name, shape in expected.items():
            if tuple(weights[name].shape) != shape:
                raise ValueError(
                    f"{prefix}{name} has shape {tuple(weights[name].shape)}, expected {shape} for {num_heads} heads "
                    f"of rank {rank} (read off retrievers.l{min(by_ordinal)}): the checkpoint is inconsistent"
                )
    return num_heads, rank


def _listed(keys: list[str], shown: int = 4) -> str:
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more
