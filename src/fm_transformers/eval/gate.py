"""The gate before the comparison: does the memory indexer select, on held-out question documents, what the answers
will need, at the resident sets LSA will really use?

Per task, at the triggers of a selected label set (label_selection.py):
- evidence_recall: at each question's own trigger, the share of its evidence chunks (those holding a statement
  that carries the answer, already made at the trigger) in the resident set;
- window_evidence_recall: at every trigger (question and answer), the share of the evidence chunks the next tau
  answer tokens read (AskedQuestion.window_evidence_chunks, made at the trigger) in the resident set: what the
  lookahead must hold for the window it serves, where evidence_recall asks the first trigger for the whole answer's;
- used_recall: at every trigger (question and answer), the share of the native top-k picks of the next tau steps
  (every CSA layer, every token: the dump's "used" counts) that fall in the resident set: level 2 reproduces the
  full cache where this is 1;
- resident_fraction: the resident set's share of the chunks that exist at the trigger.
Two resident sets, built by the cache's own rule (policies.resident_sets, with recency tail and sink): "paper",
chunks scoring at least the threshold in any target layer, uncapped; "budget", the same under the budget.

Without an indexer the labels themselves are the scores (1 where set, 0 elsewhere): what a perfect learner of the
labels would reach, the ceiling the indexer is read against. Labels that miss the evidence cannot teach it.
"""

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

from ..config import LSAConfig
from ..policies import NOT_WANTED, SelectionContext, resident_sets
from ..training import LabelShards
from .label_selection import read_questions

SELECTIONS = ("paper", "budget")

# A predictor gated in place of a MemoryIndexerModel: (doc_id, the document's dumped tensors, trigger rows) ->
# (rows, chunks) scores in [0, 1].
Scorer = Callable[[str, dict, torch.Tensor], torch.Tensor]


def trigger_scores(indexer, data: dict, rows: torch.Tensor) -> torch.Tensor:
    """(triggers, chunks) max over the indexer's layers of its scores at the dumped triggers `rows`."""
    positions = data["positions"][rows].unsqueeze(0).to(indexer.device)
    best = None
    for layer in indexer.config.layers:
        hidden = data[f"hidden/{layer}"][rows].unsqueeze(0).to(indexer.device, indexer.dtype)
        keys = data[f"keys/{layer}"].unsqueeze(0).to(indexer.device, indexer.dtype)
        scores = indexer.scores(layer, hidden, positions, keys)[0].float().cpu()
        best = scores if best is None else torch.maximum(best, scores)
    return best


def label_scores(data: dict, rows: torch.Tensor) -> torch.Tensor:
    """(triggers, chunks) the labels of the dumped triggers `rows` as scores: 1 for a labelled chunk, else 0."""
    chunks = next(value for name, value in data.items() if name.startswith("keys/")).shape[0]
    scores = torch.zeros(len(rows), chunks)
    indptr, indices = data["labels/indptr"], data["labels/indices"]
    for out, row in enumerate(rows.tolist()):
        scores[out, indices[indptr[row] : indptr[row + 1]]] = 1.0
    return scores


def resident_set(scores: torch.Tensor, visible: int, threshold: float, config: LSAConfig) -> set[int]:
    """The chunks an LSA cache with `config` keeps for one trigger's scores (chunks, ) over `visible` chunks."""
    wanted = torch.where(scores[:visible] >= threshold, scores[:visible], NOT_WANTED).unsqueeze(0)
    context = SelectionContext(visible, torch.tensor([visible]), 0, torch.device("cpu"))
    return set(resident_sets(wanted, context, config)[0].tolist())


@torch.no_grad()
def gate_metrics(
    indexer, directory: Path, budget: float, threshold: float = 0.5, budget_threshold: float = 0.0,
    recency_chunks: int = 16, sink_chunks: int = 1, scorer: Scorer | None = None,
) -> dict[str, dict[str, float]]:
    """{task: {"<selection>_<metric>": value, "question_triggers": n, "answer_triggers": n}} and an "all" entry
    pooling the tasks (micro averages). `indexer` None: the labels as the scores; `scorer` (with no indexer): a
    predictor other than MemoryIndexerModel, called as scorer(doc_id, data, rows) -> (rows, chunks) in [0, 1]."""
    if scorer is not None and indexer is not None:
        raise ValueError("pass an indexer or a scorer, not both")
    shards, questions = LabelShards(directory), read_questions(directory)
    configs = {
        "paper": (threshold, LSAConfig(recency_chunks=recency_chunks, sink_chunks=sink_chunks)),
        "budget": (budget_threshold, LSAConfig(recency_chunks=recency_chunks, sink_chunks=sink_chunks, resident_budget=budget)),
    }
    sums: dict[str, defaultdict] = defaultdict(lambda: defaultdict(float))
    rate, tau = shards.compress_rate, _tau(shards)
    was_training = indexer is not None and indexer.training
    if indexer is not None:
        indexer.eval()
    for index, document in enumerate(shards.documents):
        data = shards.load(index)
        rows = torch.arange(data["positions"].numel())
        if scorer is not None:
            scores = scorer(document.doc_id, data, rows)
        else:
            scores = label_scores(data, rows) if indexer is None else trigger_scores(indexer, data, rows)
        asked = {
            p: (q, p == q.end, window)
            for q in questions[document.doc_id]
            for p, window in zip(q.trigger_positions(tau), q.window_evidence_chunks(tau, rate))
        }
        for row, position in enumerate(data["positions"].tolist()):
            question, at_question, window = asked[position]
            visible = (position + 1) // rate
            used = _csr_row(data, "used", row)
            evidence = [chunk for chunk in question.evidence_chunks(rate) if chunk < visible]
            window = [chunk for chunk in window if chunk < visible]
            for name, (cut, config) in configs.items():
                kept = resident_set(scores[row], visible, cut, config)
                for task in (question.task, "all"):
                    _add(sums[task], name, kept, visible, used, evidence if at_question else None, window)
    if indexer is not None:
        indexer.train(was_training)
    return {task: _means(total) for task, total in sums.items()}


def _tau(shards: LabelShards) -> int:
    return shards.manifest["labels"]["tau"]


def _csr_row(data: dict, kind: str, row: int) -> dict[int, int]:
    span = slice(int(data[f"{kind}/indptr"][row]), int(data[f"{kind}/indptr"][row + 1]))
    return dict(zip(data[f"{kind}/indices"][span].tolist(), data[f"{kind}/counts"][span].tolist()))


def _add(
    total, name: str, kept: set[int], visible: int, used: dict[int, int], evidence: list[int] | None,
    window: list[int],
) -> None:
    total[f"{name}_used_hit"] += sum(count for chunk, count in used.items() if chunk in kept)
    total[f"{name}_used"] += sum(used.values())
    if window:
        total[f"{name}_window_evidence_recall"] += sum(chunk in kept for chunk in window) / len(window)
        total[f"{name}_windows"] += 1
    total[f"{name}_fraction"] += len(kept) / max(visible, 1)
    total[f"{name}_triggers"] += 1
    if evidence:  # a question trigger with evidence already made (a chunk still open is in the window)
        total[f"{name}_evidence_recall"] += sum(chunk in kept for chunk in evidence) / max(len(evidence), 1)
        total[f"{name}_questions"] += 1


def _means(total) -> dict[str, float]:
    means = {"question_triggers": int(total["paper_questions"]), "triggers": int(total["paper_triggers"])}
    for name in SELECTIONS:
        means[f"{name}_evidence_recall"] = total[f"{name}_evidence_recall"] / max(total[f"{name}_questions"], 1)
        means[f"{name}_used_recall"] = total[f"{name}_used_hit"] / max(total[f"{name}_used"], 1)
        windows = max(total[f"{name}_windows"], 1)
        means[f"{name}_window_evidence_recall"] = total[f"{name}_window_evidence_recall"] / windows
        means[f"{name}_resident_fraction"] = total[f"{name}_fraction"] / max(total[f"{name}_triggers"], 1)
    return means


BYTES_TARGET = 0.15  # the target for LSA as the paper runs it: CSA device bytes at most 15% of full's
CHOICE_RULE = (
    f"among the candidates whose paper resident set holds at most {BYTES_TARGET:.0%} of the chunks on validation, "
    "the best selection score (the mean of the window's evidence recall and the native top-k's recall); if none "
    "does, the best ranking at the fixed budget"
)
SELECTION_METRICS = ("window_evidence_recall", "used_recall")


def selection_score(metrics: dict[str, dict[str, float]], selections: tuple[str, ...] = SELECTIONS) -> float:
    """What validation maximizes: over the tasks, the mean of the window's evidence recall and used recall at
    every trigger, for the `selections` (by default both: the paper's resident set, which LSA serves with, and the
    budget's, whose size is fixed so that it compares rankings fairly). The window's evidence, not the whole
    answer's at its question: a resident set serves tau steps, and holding what they read keeps most answer tokens
    from a few percent of the chunks (examples/results/cpu_probe_window_evidence_tau16.json), where asking every
    set for the whole answer's evidence favours spreading the budget over statements read much later (until
    2026-12-06 validation used the question's evidence recall)."""
    tasks = [task for task in metrics if task != "all"]
    recalls = [f"{selection}_{metric}" for selection in selections for metric in SELECTION_METRICS]
    return sum(sum(metrics[t][name] for name in recalls) / len(recalls) for t in tasks) / len(tasks)


def choose_candidate(validation: dict[str, dict], max_resident: float = BYTES_TARGET) -> tuple[str, bool]:
    """The candidate (a key of `validation`, each a gate_metrics result) that validation prefers, and whether it
    meets `max_resident`: among those whose paper resident set holds at most that share of the chunks (so that
    LSA as the paper runs it can meet the bytes target), the best selection_score; when none does, the best
    selection_score at the budget alone, where every candidate keeps the same number of chunks (a smaller paper
    set is no merit when it is the wrong chunks: on the sixth stage the smallest one ranked at chance)."""
    if not validation:
        raise ValueError("no candidate to choose from")
    resident = {name: metrics["all"]["paper_resident_fraction"] for name, metrics in validation.items()}
    meeting = [name for name in validation if resident[name] <= max_resident]
    if meeting:
        return max(meeting, key=lambda name: selection_score(validation[name])), True
    return max(validation, key=lambda name: selection_score(validation[name], ("budget",))), False
