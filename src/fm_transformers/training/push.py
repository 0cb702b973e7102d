"""Publishing a trained indexer: a Hub repo folder (weights, config, model card) and its upload.

The card is `model_cards/indexer_card.md` filled from the indexer's config and the `training_summary.json`
that `fm-indexer train` writes beside it, so what the card claims is what the run measured. The template ships
inside the package as `fm_transformers.model_cards` (pyproject maps the top-level folder there), so an installed
wheel finds it as well as a checkout does.

A card tells users how to load the backbone only when there is one to load: a Hub repo id. An indexer of a
model made in code (`fm_transformers.tiny(seed=0)`) or kept in a local directory gets a card that says so.
"""

import json
import logging
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from string import Template

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from ..indexer import MemoryIndexerModel
from ..locate import PATH_PREFIXES, locate_pretrained
from .trainer import SUMMARY

logger = logging.getLogger(__name__)

TEMPLATE_PACKAGE, TEMPLATE_NAME = "fm_transformers.model_cards", "indexer_card.md"
# Written by `fm-indexer convert` beside a converted release: its card (source, MIT licence) is pushed as it is.
CONVERSION = "conversion.json"
NOT_RECORDED = "not recorded"


def default_template() -> str:
    """The card template shipped with the package (model_cards/indexer_card.md in the repository)."""
    return resources.files(TEMPLATE_PACKAGE).joinpath(TEMPLATE_NAME).read_text()


def hub_backbone(name: str | None) -> str | None:
    """`name` if others can load it from the Hub; None for a local path, a model made in code, or no name."""
    if not name or _is_local_path(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _is_local_path(name: str) -> bool:
    return name.startswith(PATH_PREFIXES) or Path(name).exists()


def render_card(model: MemoryIndexerModel, summary: dict | None, repo_id: str, template: str) -> str:
    """The card text; fields the summary lacks (an indexer not trained by `fm-indexer train`) say so."""
    summary = summary or {}
    config = model.config
    backbone = summary.get("backbone", {})
    data = summary.get("data") or {}
    labels = data.get("labels", {})
    base_model = config.base_model_name_or_path or backbone.get("name_or_path")
    values = {
        "title": repo_id.split("/")[-1],
        "repo_id": repo_id,
        "base_model": base_model or NOT_RECORDED,
        **_usage(base_model),
        "fingerprint": backbone.get("fingerprint", NOT_RECORDED),
        "csa_layers": backbone.get("csa_layers", NOT_RECORDED),
        "index_topk": backbone.get("index_topk", NOT_RECORDED),
        "layers": list(config.layers),
        "num_heads": config.num_heads,
        "rank": config.rank,
        "parameters": f"{model.num_parameters():,}",
        "documents": data.get("documents", NOT_RECORDED),
        "tokens": data.get("tokens", NOT_RECORDED),
        "longest_document": data.get("longest_document", NOT_RECORDED),
        "triggers": data.get("triggers", NOT_RECORDED),
        "tau": labels.get("tau", 64),
        "label_settings": ", ".join(f"{key}={value}" for key, value in sorted(labels.items())) or NOT_RECORDED,
        "hyperparameters": _table(summary.get("hyperparameters")),
        "eval_data": _eval_line(summary.get("eval_data")),
        "metrics": _metrics_table(summary.get("metrics")),
    }
    return Template(template).substitute(values)


def _usage(base_model: str | None) -> dict:
    """Card fields that say where the backbone comes from: the Hub, or nowhere a user can download it from."""
    loadable = hub_backbone(base_model)
    if loadable is not None:
        return {
            "base_model_metadata": f"base_model: {loadable}",
            "backbone_note": "Load the backbone from the Hub and attach the indexer to it:",
            "load_backbone": "from transformers import AutoModelForCausalLM\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{loadable}", dtype="auto", device_map="auto")',
        }
    if not base_model:
        trained_on = "a backbone it does not record"
    elif _is_local_path(base_model):
        trained_on = f"`{base_model}`, a local directory, not a Hub repo"
    else:
        trained_on = f"`{base_model}`, which is not a Hub repo (a model made in code)"
    return {
        "base_model_metadata": "# base_model: none on the Hub",
        "backbone_note": f"There is no backbone to download: this indexer was trained on {trained_on}. Build or load "
        "that same model the way it was made for training, then attach the indexer:",
        "load_backbone": "model = ...  # the backbone this indexer was trained on",
    }


def _eval_line(eval_data: dict | None) -> str:
    if not eval_data:
        return "none"
    return f"{eval_data['documents']} documents, {eval_data['tokens']} tokens, {eval_data['triggers']} trigger steps"


def _table(values: dict | None) -> str:
    if not values:
        return NOT_RECORDED
    rows = "\n".join(f"| {key} | {value} |" for key, value in sorted(values.items()) if value is not None)
    return "| setting | value |\n|---|---|\n" + rows


def _metrics_table(metrics: dict | None) -> str:
    if not metrics:
        return "No held-out evaluation was recorded."
    names = ("precision", "recall", "f1", "resident_fraction", "used_recall", "used_chunk_recall")
    rows = "\n".join(f"| {name} | {metrics[name]:.4f} | {metrics['recency'][name]:.4f} |" for name in names)
    return (
        f"Threshold {metrics['threshold']}.\n\n| metric | memory indexer | recency, same size |\n|---|---|---|\n{rows}"
    )


def build_repo_folder(indexer_dir: str | Path, repo_id: str, folder: str | Path, template_path=None) -> Path:
    """Write config, weights, summary and README.md of the indexer in `indexer_dir` to `folder`."""
    location, folder = locate_pretrained(indexer_dir), Path(folder)
    model = MemoryIndexerModel.from_pretrained(location)
    converted = Path(location) / CONVERSION
    if converted.is_file() and template_path is None:  # the release's weights: keep the card naming them
        card, copied = (Path(location) / "README.md").read_text(), converted
    else:
        summary_path = Path(location) / SUMMARY  # written by fm-indexer train; a Hub repo id has none here
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
        if summary is None:
            logger.warning("%s has no %s: the card will say 'not recorded' for data and metrics", location, SUMMARY)
        card, copied = render_card(model, summary, repo_id, _read_template(template_path)), summary_path if summary else None
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    if copied is not None:
        shutil.copyfile(copied, folder / copied.name)
    (folder / "README.md").write_text(card)
    return folder


def _read_template(template_path) -> str:
    if template_path is None:
        return default_template()
    if not Path(template_path).is_file():
        raise FileNotFoundError(f"card template {template_path} not found: pass --card-template with an existing file")
    return Path(template_path).read_text()


def push(
    indexer_dir: str | Path,
    repo_id: str,
    local_dir: str | Path | None = None,
    private: bool = False,
    token: str | None = None,
    template_path=None,
) -> str:
    """Upload the repo folder to the Hub, or with `local_dir` only write it there; returns where it went."""
    if local_dir is not None:
        return str(build_repo_folder(indexer_dir, repo_id, local_dir, template_path))
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as staging:
        build_repo_folder(indexer_dir, repo_id, staging, template_path)
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=staging, repo_id=repo_id, commit_message="Upload memory indexer")
    return str(commit.commit_url)
