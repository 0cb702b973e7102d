"""Publishing a trained indexer: a Hub repo folder (weights, config, model card) and its upload.

The card is `model_cards/indexer_card.md` filled from the indexer's config and the `training_summary.json`
that `fm-indexer train` writes beside it, so what the card claims is what the run measured.
"""

import json
import logging
import shutil
import tempfile
from pathlib import Path
from string import Template

from ..indexer import MemoryIndexerModel
from .trainer import SUMMARY

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATE = Path(__file__).resolve().parents[3] / "model_cards" / "indexer_card.md"
NOT_RECORDED = "not recorded"


def render_card(model: MemoryIndexerModel, summary: dict | None, repo_id: str, template: str) -> str:
    """The card text; fields the summary lacks (an indexer not trained by `fm-indexer train`) say so."""
    summary = summary or {}
    config = model.config
    backbone = summary.get("backbone", {})
    data = summary.get("data") or {}
    labels = data.get("labels", {})
    values = {
        "title": repo_id.split("/")[-1],
        "repo_id": repo_id,
        "base_model": config.base_model_name_or_path or backbone.get("name_or_path") or NOT_RECORDED,
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
    indexer_dir, folder = Path(indexer_dir), Path(folder)
    template_path = Path(template_path) if template_path else DEFAULT_TEMPLATE
    if not template_path.is_file():
        raise FileNotFoundError(
            f"card template {template_path} not found: pass --card-template with the path of indexer_card.md"
        )
    model = MemoryIndexerModel.from_pretrained(indexer_dir)
    summary_path = indexer_dir / SUMMARY
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    if summary is None:
        logger.warning("%s has no %s: the card will say 'not recorded' for data and metrics", indexer_dir, SUMMARY)
    card = render_card(model, summary, repo_id, template_path.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    if summary is not None:
        shutil.copyfile(summary_path, folder / SUMMARY)
    (folder / "README.md").write_text(card)
    return folder


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
