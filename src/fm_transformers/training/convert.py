"""`fm-indexer convert`: the paper's released memory indexer as a normal indexer directory (config, weights and a
model card naming the source and its MIT licence), which attach_memory_indexer and AutoLSAModelForCausalLM load.

The conversion itself is fm_transformers.official; this module writes its result the way `fm-indexer push` writes
a trained one, with a card of its own (model_cards/official_indexer_card.md): the release has no training summary
to report, and its licence is not this project's.
"""

import json
from importlib import resources
from pathlib import Path
from string import Template

from ..indexer import MemoryIndexerModel
from ..layout import csa_layers
from ..official import OFFICIAL_REPO
from .push import CONVERSION, TEMPLATE_PACKAGE, _usage

TEMPLATE_NAME = "official_indexer_card.md"


def write_official_indexer(model: MemoryIndexerModel, output: str | Path, checkpoint: str) -> Path:
    """save_pretrained into `output`, with README.md saying where the weights come from and conversion.json marking
    the directory as a converted release (so `fm-indexer push` keeps that card); returns `output`."""
    output = Path(output)
    model.save_pretrained(output)
    (output / "README.md").write_text(render_official_card(model, checkpoint))
    (output / CONVERSION).write_text(json.dumps({"source": OFFICIAL_REPO, "checkpoint": checkpoint}, indent=2) + "\n")
    return output


def render_official_card(model: MemoryIndexerModel, checkpoint: str) -> str:
    config = model.config
    backbone_csa = csa_layers(config.backbone)
    values = {
        "source_repo": OFFICIAL_REPO,
        "checkpoint": checkpoint,
        "base_model": config.base_model_name_or_path or "a DeepSeek-V4 it does not record",
        **_usage(config.base_model_name_or_path),
        "layers": list(config.layers),
        "ordinals": [backbone_csa.index(layer) for layer in config.layers],
        "num_heads": config.num_heads,
        "rank": config.rank,
        "parameters": f"{model.num_parameters():,}",
        "tau": config.tau,
    }
    return Template(default_official_template()).substitute(values)


def default_official_template() -> str:
    """The card template shipped with the package (model_cards/official_indexer_card.md in the repository)."""
    return resources.files(TEMPLATE_PACKAGE).joinpath(TEMPLATE_NAME).read_text()
