"""Settings chosen on a validation draw of examples, never on the examples reported.

Two settings are left open by the paper at this scale: the recency tail of LSA (the release keeps 2048 entries at
1M tokens; nothing says what a 2K-token context needs), and the score a chunk needs to compete for the fixed
budget of "lsa (budget)". Each candidate runs on the validation examples: the tail with the best "lsa" mean
accuracy is chosen (ties: the shorter tail, fewer bytes), then at that tail the threshold with the best
"lsa (budget)" accuracy (ties: the lower one). Every candidate's accuracy goes into the report.
"""

from dataclasses import asdict, replace

from .comparison import run_comparison
from .methods import Row, RowSettings, paper_rows
from .tasks import Example


def _row(indexer, settings: RowSettings, name: str, label: str) -> Row:
    (row,) = [row for row in paper_rows(indexer, settings, paging=False) if row.name == name]
    return replace(row, name=label)


def tune(
    model, indexer, examples: list[Example], base: RowSettings, tails: list[int], thresholds: list[float],
    batch_size: int = 16, progress: bool = True, graph: bool | None = None,
) -> tuple[RowSettings, dict]:
    """(the chosen settings, a report of every candidate's mean accuracy)."""
    rows, lsa, budgeted = [Row("full")], {}, {}
    for tail in tails:
        lsa[tail] = f"lsa | tail {tail}"
        rows.append(_row(indexer, replace(base, recency_chunks=tail), "lsa", lsa[tail]))
        for threshold in thresholds:
            budgeted[tail, threshold] = f"lsa (budget) | tail {tail} threshold {threshold:g}"
            settings = replace(base, recency_chunks=tail, budget_threshold=threshold)
            rows.append(_row(indexer, settings, "lsa (budget)", budgeted[tail, threshold]))
    records = run_comparison(model, examples, rows, batch_size, progress, graph)
    accuracy = {name: _mean_accuracy(found) for name, found in records.items()}
    tail = min(tails, key=lambda t: (-accuracy[lsa[t]], t))
    threshold = min(thresholds, key=lambda h: (-accuracy[budgeted[tail, h]], h))
    chosen = replace(base, recency_chunks=tail, budget_threshold=threshold)
    return chosen, {"candidates": accuracy, "chosen": {"recency_chunks": tail, "budget_threshold": threshold}, "settings": asdict(chosen)}


def _mean_accuracy(records: list[dict]) -> float:
    tasks: dict[str, list[bool]] = {}
    for record in records:
        tasks.setdefault(record["task"], []).append(record["correct"])
    return sum(sum(answers) / len(answers) for answers in tasks.values()) / len(tasks)
