import pytest

from fm_transformers.eval.statistics import paired_bootstrap


def test_identical_answers_differ_by_exactly_zero():
    answers = {"a": [True, False, True, True], "b": [False, True]}
    assert paired_bootstrap(answers, answers) == {"difference": 0.0, "low": 0.0, "high": 0.0}


def test_the_difference_is_the_mean_over_tasks_of_the_task_differences():
    method = {"a": [True] * 10, "b": [True] * 2 + [False] * 8}
    reference = {"a": [False] * 10, "b": [True] * 4 + [False] * 6}
    result = paired_bootstrap(method, reference)
    assert result["difference"] == pytest.approx((1.0 + -0.2) / 2)
    assert result["low"] <= result["difference"] <= result["high"]


def test_a_consistent_small_gain_has_an_interval_above_zero_and_a_mixed_one_spans_it():
    reference = {"a": [False] * 20 + [True] * 180}
    better = {"a": [True] * 200}  # 20 more right, none lost
    assert paired_bootstrap(better, reference)["low"] > 0
    mixed = {"a": [True] * 10 + [False] * 10 + [True] * 170 + [False] * 10}  # 10 gained, 10 lost
    result = paired_bootstrap(mixed, reference)
    assert result["difference"] == 0.0 and result["low"] < 0 < result["high"]


def test_pairing_narrows_the_interval_of_two_rows_that_mostly_agree():
    reference = {"a": [i % 2 == 0 for i in range(200)]}
    close = {"a": [i % 2 == 0 or i == 1 for i in range(200)]}  # one more right than reference
    result = paired_bootstrap(close, reference)
    assert result["high"] - result["low"] <= 0.02  # unpaired, two 50% accuracies over 200 would give about +-0.1


def test_the_interval_is_a_function_of_the_seed():
    method, reference = {"a": [True, False] * 30}, {"a": [False, True, True] * 20}
    assert paired_bootstrap(method, reference, seed=3) == paired_bootstrap(method, reference, seed=3)
    assert paired_bootstrap(method, reference, seed=3) != paired_bootstrap(method, reference, seed=4)


def test_unpaired_rows_are_an_error():
    with pytest.raises(ValueError, match="same examples"):
        paired_bootstrap({"a": [True, False]}, {"a": [True]})
    with pytest.raises(ValueError, match="same tasks"):
        paired_bootstrap({"a": [True]}, {"b": [True]})
