"""From the comparison's per-example records to the table: accuracy per task with paired bootstrap intervals
against full, memory and recall costs per row; and the joining of runs made in parts.

Two accuracies, each with its interval: exact match (the whole answer right) and token accuracy (the share of
answer tokens written at their place). A 26-question block or a 26-hop chain fails its exact match on one wrong
token, so where the full cache itself rarely answers whole, token accuracy is what still tells rows apart.

The matched rows (recency and random at LSA's bytes) also get the interval of LSA's lead over them, paired
example by example: what the issue's "at least 20 points below LSA" is read from. A row may cover only some of
the examples (the recipe runs the costly native-paging rows on the first part of each task only): it is then
read against full's records of the same examples.

A run's records are {length: {row: [record, ...]}}, each record naming its task and its example index (the
example's place among that task's examples of that length and seed). Parts of one comparison (other lengths,
tasks or example ranges, same settings) join into one set of records; an example found twice is an error.
"""

from collections import defaultdict

from .statistics import paired_bootstrap

REFERENCE = "full"
LSA = "lsa"
MATCHED = ("recency (matched)", "random (matched)")


def join_records(parts: list[dict]) -> dict:
    """One {length: {row: [records]}} from parts; records sorted by (task, index)."""
    joined: dict = defaultdict(lambda: defaultdict(dict))
    for part in parts:
        for length, rows in part.items():
            for row, records in rows.items():
                for record in records:
                    key = (record["task"], record["index"])
                    if key in joined[length][row]:
                        raise ValueError(f"example {key} of row {row!r} at length {length} appears in more than one part")
                    joined[length][row][key] = record
    return {
        length: {row: [records[key] for key in sorted(records)] for row, records in rows.items()}
        for length, rows in sorted(joined.items(), key=lambda item: int(item[0]))
    }


def _by_task(records: list[dict], score: str = "correct") -> dict[str, list[float]]:
    """Each task's per-example scores: exact match ("correct") or the share of answer tokens right ("tokens")."""
    tasks: dict[str, list[float]] = defaultdict(list)
    for record in records:
        value = record["correct"] if score == "correct" else record["tokens_right"] / record["tokens"]
        tasks[record["task"]].append(value)
    return dict(tasks)


def _means(tasks: dict[str, list[float]]) -> dict[str, float]:
    return {task: sum(scores) / len(scores) for task, scores in tasks.items()}


def _over_tasks(means: dict[str, float]) -> float:
    return sum(means.values()) / len(means)


def mean_over_tasks(records: list[dict], score: str = "correct") -> float:
    """The mean over tasks of a row's per-task mean score: exact match ("correct") or token accuracy ("tokens")."""
    return _over_tasks(_means(_by_task(records, score)))


def _mean(records: list[dict], name: str) -> float | None:
    values = [record[name] for record in records if record.get(name) is not None]
    return sum(values) / len(values) if values else None


def _max(records: list[dict], name: str) -> float | None:
    values = [record[name] for record in records if record.get(name) is not None]
    return max(values) if values else None


def summarize_row(records: list[dict], reference: list[dict], samples: int = 2000, seed: int = 0) -> dict:
    """One row at one length: exact match and token accuracy per task and their means over tasks, the bootstrap
    of each's difference to the reference (None for the reference itself), and the mean costs per generation."""
    tasks, token_tasks = _by_task(records), _by_task(records, "tokens")
    accuracy, token_accuracy = _means(tasks), _means(token_tasks)
    versus = None if records is reference else paired_differences(records, reference, samples, seed)
    full_bytes = _mean(reference, "csa_device_bytes")
    device_bytes = _mean(records, "csa_device_bytes")
    tokens = _mean(records, "tokens")
    syncs = _mean(records, "host_syncs")
    return {
        "examples": len(records),
        "accuracy": accuracy,
        "mean_accuracy": _over_tasks(accuracy),
        "vs_full": None if versus is None else versus["exact"],
        "token_accuracy": token_accuracy,
        "mean_token_accuracy": _over_tasks(token_accuracy),
        "tokens_vs_full": None if versus is None else versus["tokens"],
        "csa_device_bytes": device_bytes,
        "csa_device_ratio": device_bytes / full_bytes if full_bytes else None,
        "triggers": _mean(records, "triggers"),
        "chunks_fetched": _mean(records, "chunks_fetched"),
        "refreshes": _mean(records, "refreshes"),
        "refresh_scored_chunks_per_token": None if _mean(records, "refresh_scored_chunks") is None else _mean(records, "refresh_scored_chunks") / tokens,
        "host_syncs_per_token": None if syncs is None else syncs / tokens,
        "prefill_peak_bytes": _max(records, "prefill_peak_bytes"),
        "decode_peak_bytes": _max(records, "decode_peak_bytes"),
        "seconds_per_example": _mean(records, "seconds"),
    }


def summarize(records: dict, samples: int = 2000, seed: int = 0) -> dict:
    """{length: {row: summarize_row(...)}} against the "full" row of the same length; each matched row with
    "lsa_lead" besides."""
    summary = {}
    for length, rows in records.items():
        summary[length] = {
            row: summarize_row(found, same_examples(rows[REFERENCE], found), samples, seed)
            for row, found in rows.items()
        }
        for row in MATCHED:
            if row in rows and LSA in rows:
                summary[length][row]["lsa_lead"] = paired_differences(rows[LSA], rows[row], samples, seed)
    return summary


def same_examples(reference: list[dict], records: list[dict]) -> list[dict]:
    """The reference's records of the examples in `records` (by task and example index), in the reference's order:
    the reference itself when the row has every example."""
    if len(records) == len(reference):
        return reference
    if any("index" not in record for record in (*records, *reference)):
        raise ValueError(
            "a row covers fewer examples than full, and records without an example index cannot be paired"
        )
    wanted = {(record["task"], record["index"]) for record in records}
    found = [record for record in reference if (record["task"], record["index"]) in wanted]
    if len(found) != len(wanted):
        missing = len(wanted) - len(found)
        raise ValueError(f"{missing} examples of a row are missing from full's records: pair the same examples")
    return found


def paired_differences(records: list[dict], reference: list[dict], samples: int = 2000, seed: int = 0) -> dict:
    """{"exact", "tokens"}: the paired bootstrap of a row's exact match and token accuracy minus the reference's
    (against full: vs_full and tokens_vs_full; LSA against a matched row: lsa_lead)."""
    return {
        "exact": paired_bootstrap(_by_task(records), _by_task(reference), samples, seed=seed),
        "tokens": paired_bootstrap(_by_task(records, "tokens"), _by_task(reference, "tokens"), samples, seed=seed),
    }


def _cell(value, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def _versus(interval: dict | None) -> str:
    if interval is None:
        return "-"
    return f"{100 * interval['difference']:+.1f} ({100 * interval['low']:+.1f}, {100 * interval['high']:+.1f})"


def format_table(summary: dict) -> str:
    """Mean exact match % and token accuracy %, each with its 95% interval against full, CSA bytes on the device
    over full's, triggers and chunks fetched per generation, peak device MiB in prefill / decode, host syncs per
    token."""
    header = (
        f"{'length':>6} | {'row':<20} | {'EM %':>5} | {'vs full (95% CI), points':<26} | {'tok %':>5} | "
        f"{'tokens vs full (95% CI)':<26} | {'CSA/full':>8} | {'triggers':>8} | {'fetched':>8} | "
        f"{'prefill/decode peak MiB':>23} | {'syncs/tok':>9}"
    )
    lines = [header, "-" * len(header)]
    for length, rows in summary.items():
        for row, entry in rows.items():
            peaks = f"{_cell(entry['prefill_peak_bytes'], 2**-20)} / {_cell(entry['decode_peak_bytes'], 2**-20)}"
            lines.append(
                f"{length:>6} | {row:<20} | {100 * entry['mean_accuracy']:>5.1f} | {_versus(entry['vs_full']):<26} | "
                f"{100 * entry['mean_token_accuracy']:>5.1f} | {_versus(entry['tokens_vs_full']):<26} | "
                f"{_cell(entry['csa_device_ratio'], digits=3):>8} | {_cell(entry['triggers']):>8} | "
                f"{_cell(entry['chunks_fetched']):>8} | {peaks:>23} | {_cell(entry['host_syncs_per_token'], digits=2):>9}"
            )
    return "\n".join(lines)


def format_lead(summary: dict) -> str:
    """LSA's lead over each matched row in exact match and token accuracy, points with 95% intervals."""
    lines = [f"{'length':>6} | {'LSA minus':<20} | {'exact match (95% CI)':<26} | {'tokens right (95% CI)':<26}"]
    for length, rows in summary.items():
        for row, entry in rows.items():
            if "lsa_lead" in entry:
                lead = entry["lsa_lead"]
                lines.append(f"{length:>6} | {row:<20} | {_versus(lead['exact']):<26} | {_versus(lead['tokens']):<26}")
    return "\n".join(lines)


def format_tasks(summary: dict) -> str:
    """Exact match % per task (token accuracy % in parentheses), one line per length and row."""
    lines = []
    for length, rows in summary.items():
        for row, entry in rows.items():
            tasks = "  ".join(
                f"{task} {100 * value:5.1f} ({100 * entry['token_accuracy'][task]:5.1f})"
                for task, value in entry["accuracy"].items()
            )
            lines.append(f"{length:>6} | {row:<20} | {tasks}")
    return "\n".join(lines)
