"""Settings chosen on a validation draw of examples, never on the examples reported.

Two settings are left open by the paper at this scale: the recency tail of LSA (the release keeps 2048 entries at
1M tokens; nothing says what a 2K-token context needs), and the score a chunk needs to compete for the fixed
budget of "lsa (budget)". Each candidate runs on the validation examples: the tail with the best "lsa" mean
exact match is chosen (ties: the better token accuracy, then the shorter tail, fewer bytes); the budgeted rows
get a tail of their own, since theirs counts against the budget: the (tail, threshold) pair with the best
"lsa (budget)" exact match (ties: token accuracy, then the shorter tail, then the lower threshold). The oracle
and paging rows share the budgeted rows' settings. Token accuracy breaks ties because long answers are rarely
whole: where every candidate's exact match is 0, it is what tells them apart. Every candidate's two accuracies go
into the report.
"""

from dataclasses import asdict, replace

from .comparison import run_comparison
from .methods import Row, RowSettings, paper_rows
from .summary import mean_over_tasks
from .tasks import Example


def _row(indexer, settings: RowSettings, name: str, label: str) -> Row:
    (row,) = [row for row in paper_rows(indexer, settings, paging=False) if row.name == name]
    return replace(row, name=label)


def tune(
    model, indexer, examples: list[Example], base: RowSettings, tails: list[int], thresholds: list[float],
    batch_size: int = 16, progress: bool = True, graph: bool | None = None,
) -> tuple[RowSettings, dict]:
    """(the chosen settings, a report of every candidate's mean exact match and token accuracy)."""
    rows, lsa, budgeted = [Row("full")], {}, {}
    for tail in tails:
        lsa[tail] = f"lsa | tail {tail}"
        rows.append(_row(indexer, replace(base, recency_chunks=tail), "lsa", lsa[tail]))
        for threshold in thresholds:
            budgeted[tail, threshold] = f"lsa (budget) | tail {tail} threshold {threshold:g}"
            settings = replace(base, budget_recency_chunks=tail, budget_threshold=threshold)
            rows.append(_row(indexer, settings, "lsa (budget)", budgeted[tail, threshold]))
    records = run_comparison(model, examples, rows, batch_size, progress, graph)
    accuracy = {
        name: {"exact_match": mean_over_tasks(found), "token_accuracy": mean_over_tasks(found, "tokens")}
        for name, found in records.items()
    }
    tail = best_setting({t: lsa[t] for t in tails}, accuracy)
    budget_tail, threshold = best_setting(budgeted, accuracy)
    picked = {"recency_chunks": tail, "budget_recency_chunks": budget_tail, "budget_threshold": threshold}
    chosen = replace(base, **picked)
    return chosen, {"candidates": accuracy, "chosen": picked, "settings": asdict(chosen)}


def best_setting(candidates: dict, accuracy: dict[str, dict[str, float]]):
    """The setting (a tail, or a (tail, threshold) pair) whose row has the best exact match, then token accuracy,
    then the smallest setting; `candidates` maps a setting to its row's name in `accuracy`."""
    def rank(value) -> tuple:
        row = accuracy[candidates[value]]
        return -row["exact_match"], -row["token_accuracy"], value

    return min(candidates, key=rank)
