"""What a backbone must satisfy for the evaluation to test the paper's method, checked, not assumed.

- Three target layers (the memory indexer's) at 50-100% of the depth, as CSA ordinals 10, 12 and 20 of
  V4-Flash's 21 are: `default_target_layers` scales those ordinals, which needs at least 5 CSA layers for three
  distinct layers.
- The target layers' index keys stay on the device in full; they must be a small share of the CSA bytes, or LSA
  saves little whatever it selects.
- At every evaluated length the resident budget must be at least TOP_K_FACTOR times the native top-k: with
  fewer chunks resident than the native indexer picks, level 2 has nothing to choose from.
"""

from ..config import LSAConfig
from ..indexer import default_target_layers
from ..layout import csa_compress_rate, csa_layers

PAPER_TRAINING_LENGTH = 2048
PAPER_LENGTHS = (2048, 4096, 8192)  # the training length to 4x it
PAPER_BUDGET = 0.1  # resident share of the history: the paper's ~10%
TOP_K_FACTOR = 4
MAX_INDEX_KEY_SHARE = 0.05
MIN_TARGET_DEPTH = 0.5


def index_key_share(config, target_layers) -> float:
    """Share of a full CSA cache's bytes that the target layers' index keys take: per chunk a CSA layer holds
    head_dim KV values and index_head_dim key values, both at the model's dtype."""
    per_chunk = len(csa_layers(config)) * (config.head_dim + config.index_head_dim)
    return len(target_layers) * config.index_head_dim / per_chunk


def budget_chunks(length: int, compress_rate: int, budget: float = PAPER_BUDGET) -> int:
    """Resident chunks a budget allows at a context of `length` tokens (the cache's own arithmetic)."""
    return LSAConfig(resident_budget=budget).budget_chunks(length // compress_rate)


def check_budget_covers_top_k(config, lengths, budget: float = PAPER_BUDGET, factor: int = TOP_K_FACTOR) -> None:
    """Raise unless the budget holds at least `factor` x index_topk chunks at every length."""
    need = factor * config.index_topk
    for length in lengths:
        have = budget_chunks(length, csa_compress_rate(config), budget)
        if have < need:
            raise ValueError(
                f"at {length} tokens a {budget:.0%} budget holds {have} chunks, fewer than {factor} x index_topk "
                f"({need}): evaluate longer contexts or use a backbone with a smaller index_topk"
            )


def check_paper_layout(config, lengths, budget: float = PAPER_BUDGET) -> dict:
    """Raise unless the backbone has the paper's layout at these lengths; returns what was checked."""
    csa = csa_layers(config)
    targets = default_target_layers(config)
    if len(targets) < 3:
        raise ValueError(f"{len(csa)} CSA layers give the target layers {targets}: the paper's three need at least 5")
    depths = [(layer + 1) / config.num_hidden_layers for layer in targets]
    if min(depths) < MIN_TARGET_DEPTH:
        raise ValueError(f"target layers {targets} start at {min(depths):.0%} of the depth, under {MIN_TARGET_DEPTH:.0%}")
    share = index_key_share(config, targets)
    if share > MAX_INDEX_KEY_SHARE:
        raise ValueError(f"the target layers' index keys are {share:.1%} of the CSA bytes, over {MAX_INDEX_KEY_SHARE:.0%}")
    check_budget_covers_top_k(config, lengths, budget)
    return {
        "csa_layers": csa,
        "target_layers": targets,
        "target_depths": depths,
        "index_key_share": share,
        "budget_chunks": {length: budget_chunks(length, csa_compress_rate(config), budget) for length in lengths},
        "index_topk": config.index_topk,
    }
