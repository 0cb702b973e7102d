"""The comparison's two accuracies: exact match and the share of answer tokens right, each with its interval
against full, in the table and in the choice of tuned settings."""

import pytest

from fm_transformers.eval.methods import RowSettings
from fm_transformers.eval.summary import (
    format_lead,
    format_table,
    format_tasks,
    mean_over_tasks,
    summarize,
    summarize_row,
)
from fm_transformers.eval.tasks import tokens_right
from fm_transformers.eval.tuning import best_setting


def test_tokens_right_counts_answer_tokens_at_their_place():
    assert tokens_right([1, 2, 9, 4], [1, 2, 3, 4]) == 3
    assert tokens_right([2, 3, 4, 1], [1, 2, 3, 4]) == 0  # shifted by one: nothing at its place
    assert tokens_right([1, 2, 3, 4, 5, 6], [1, 2, 3, 4]) == 4  # tokens past the answer are not its tokens


def record(task, right, tokens=4):
    return {"task": task, "correct": right == tokens, "tokens_right": right, "tokens": tokens}


def test_a_row_loses_whole_answers_and_tokens_against_full():
    full = [record("a", 4), record("a", 4), record("b", 2), record("b", 0)]
    row = [record("a", 2), record("a", 4), record("b", 1), record("b", 0)]
    entry = summarize_row(row, full, samples=500)
    assert entry["accuracy"] == {"a": 0.5, "b": 0.0}
    assert entry["token_accuracy"] == {"a": 0.75, "b": 0.125}
    assert entry["mean_accuracy"] == pytest.approx(0.25) == mean_over_tasks(row)
    assert entry["mean_token_accuracy"] == pytest.approx(0.4375) == mean_over_tasks(row, "tokens")
    assert entry["vs_full"]["difference"] == pytest.approx(-0.25)  # (0.5 - 1 + 0 - 0) / 2
    assert entry["tokens_vs_full"]["difference"] == pytest.approx(-0.1875)  # (0.75 - 1 + 0.125 - 0.25) / 2
    assert entry["tokens_vs_full"]["low"] <= -0.1875 <= entry["tokens_vs_full"]["high"]
    reference = summarize_row(full, full, samples=500)
    assert reference["vs_full"] is None and reference["tokens_vs_full"] is None


def test_a_row_on_some_of_the_examples_is_read_against_fulls_same_examples():
    """The paging rows run on the first part of each task only: paired by (task, index), not by position."""
    full = [{**record(task, right), "index": index, "csa_device_bytes": 8.0}
            for task in ("a", "b") for index, right in enumerate((4, 0, 4, 0))]
    first_two = [{**record(task, 2), "index": index, "csa_device_bytes": 2.0}
                 for task in ("a", "b") for index in (0, 1)]
    entry = summarize({"2048": {"full": full, "native paging": first_two}}, samples=200)["2048"]["native paging"]
    assert entry["examples"] == 4
    assert entry["vs_full"]["difference"] == pytest.approx(-0.5)  # full's first two: one whole; the row: none
    assert entry["tokens_vs_full"]["difference"] == pytest.approx(0.0)  # 2 of 4 against (4 + 0) / 2 of 4
    assert entry["csa_device_ratio"] == pytest.approx(0.25)
    unindexed = [record("a", 2)]
    with pytest.raises(ValueError, match="without an example index"):
        summarize({"2048": {"full": full, "native paging": unindexed}}, samples=10)


def test_the_table_prints_both_accuracies():
    full = [record("a", 4), record("a", 3)]
    row = [record("a", 4), record("a", 1)]
    entries = {"full": summarize_row(full, full, samples=200), "lsa": summarize_row(row, full, samples=200)}
    for entry in entries.values():
        entry.update(csa_device_ratio=None, triggers=None, chunks_fetched=None, prefill_peak_bytes=None,
                     decode_peak_bytes=None, host_syncs_per_token=None)
    table = format_table({"2048": entries}).splitlines()
    assert "tok %" in table[0] and "tokens vs full" in table[0]
    assert "|  87.5 |" in table[2] and "|  62.5 |" in table[3] and "-25.0" in table[3]
    assert format_tasks({"2048": entries}).splitlines()[1].endswith("a  50.0 ( 62.5)")


def test_lsas_lead_over_each_matched_row_is_paired_example_by_example():
    full = [record("a", 4), record("a", 4), record("b", 4), record("b", 4)]
    lsa = [record("a", 4), record("a", 2), record("b", 3), record("b", 1)]
    recency = [record("a", 2), record("a", 2), record("b", 3), record("b", 0)]
    rows = {"full": full, "lsa": lsa, "recency (matched)": recency, "lsa (budget)": recency}
    summary = summarize({"2048": rows}, samples=500)["2048"]
    assert "lsa_lead" not in summary["lsa (budget)"] and "lsa_lead" not in summary["lsa"]
    lead = summary["recency (matched)"]["lsa_lead"]
    assert lead["exact"]["difference"] == pytest.approx(0.25)  # a: 0.5 - 0, b: 0 - 0
    assert lead["tokens"]["difference"] == pytest.approx(0.1875)  # a: 0.75 - 0.5, b: 0.5 - 0.375
    assert lead["tokens"]["low"] <= 0.1875 <= lead["tokens"]["high"]
    assert format_lead({"2048": summary}).splitlines()[1].split("|")[2].strip().startswith("+25.0")


def test_tuning_prefers_exact_match_then_token_accuracy_then_the_smaller_setting():
    accuracy = {
        "t2": {"exact_match": 0.0, "token_accuracy": 0.6},
        "t4": {"exact_match": 0.0, "token_accuracy": 0.8},
        "t8": {"exact_match": 0.0, "token_accuracy": 0.8},
    }
    assert best_setting({2: "t2", 4: "t4", 8: "t8"}, accuracy) == 4
    accuracy["t2"]["exact_match"] = 0.05
    assert best_setting({2: "t2", 4: "t4", 8: "t8"}, accuracy) == 2


def test_the_budgeted_rows_tail_is_chosen_with_their_threshold_apart_from_the_uncapped_rows_tail():
    """At 2K a long tail suits uncapped LSA and starves the budgeted rows (their tail counts against the budget):
    the pair is chosen on the budgeted row's own accuracy, ties to the shorter tail, then the lower threshold."""
    accuracy = {
        "budget 32 0": {"exact_match": 0.0, "token_accuracy": 0.071},
        "budget 4 0": {"exact_match": 0.0, "token_accuracy": 0.087},
        "budget 4 0.3": {"exact_match": 0.0, "token_accuracy": 0.087},
        "budget 16 0": {"exact_match": 0.0, "token_accuracy": 0.087},
    }
    pairs = {(32, 0.0): "budget 32 0", (4, 0.0): "budget 4 0", (4, 0.3): "budget 4 0.3", (16, 0.0): "budget 16 0"}
    assert best_setting(pairs, accuracy) == (4, 0.0)
    settings = RowSettings(recency_chunks=32, budget_recency_chunks=4, budget=0.1)
    assert settings.cache_config()["recency_chunks"] == 32
    assert settings.cache_config(budget=True)["recency_chunks"] == 4
    assert RowSettings(recency_chunks=32).cache_config(budget=True)["recency_chunks"] == 32  # settings of before
