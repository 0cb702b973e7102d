import pytest

from fm_transformers.eval import eval_backbone_config
from fm_transformers.eval.paper_layout import (
    PAPER_LENGTHS,
    budget_chunks,
    check_budget_covers_top_k,
    check_paper_layout,
    index_key_share,
)


def test_the_paper_backbone_has_three_deep_targets_small_index_keys_and_room_for_level_2():
    config = eval_backbone_config("paper")
    checked = check_paper_layout(config, PAPER_LENGTHS)
    assert config.num_hidden_layers == 16 and len(checked["csa_layers"]) == 7
    assert checked["target_layers"] == [8, 10, 14] and min(checked["target_depths"]) >= 0.5
    assert checked["index_key_share"] == pytest.approx(3 * 32 / (7 * (256 + 32)))
    assert min(checked["budget_chunks"].values()) >= 4 * config.index_topk


def test_the_budget_check_names_the_length_where_level_2_would_starve():
    config = eval_backbone_config("paper")
    check_budget_covers_top_k(config, [2048])
    with pytest.raises(ValueError, match="at 1024 tokens a 10% budget holds 25 chunks"):
        check_budget_covers_top_k(config, [2048, 1024])


def test_the_earlier_backbone_fails_the_checks_the_issue_found():
    small = eval_backbone_config("small")
    with pytest.raises(ValueError, match="at 512 tokens"):
        check_budget_covers_top_k(small, [512])
    with pytest.raises(ValueError, match="at least 5"):
        check_paper_layout(small, [8192])


def test_the_smoke_size_keeps_the_layout_at_its_smoke_length():
    config = eval_backbone_config("paper-smoke")
    assert check_paper_layout(config, [384])["target_layers"] == [8, 10, 14]


def test_budget_and_key_share_follow_the_config():
    assert budget_chunks(2048, 4) == 51 and budget_chunks(8192, 4, 0.05) == 102
    config = eval_backbone_config("paper-smoke")
    assert index_key_share(config, [8]) == pytest.approx(8 / (7 * (64 + 8)))
