"""Paired bootstrap intervals for the difference in accuracy between a row and the full cache, for any score
in [0, 1] per example (an exact match, a share of tokens right).

Paired: both rows answered the same examples, so an example is resampled with both of its answers, and the
noise of which examples were drawn cancels. Stratified: each task's examples are resampled among themselves and
the difference is the mean over tasks of the per-task differences (the table's mean over tasks), so every
bootstrap sample weighs the tasks as the table does.
"""

import torch


def paired_bootstrap(
    method: dict[str, list[float]], reference: dict[str, list[float]], samples: int = 2000, level: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """{"difference", "low", "high"}: the mean over tasks of accuracy(method) - accuracy(reference), and the
    `level` percentile interval of that difference over `samples` resamples (a function of `seed`)."""
    if sorted(method) != sorted(reference) or not method:
        raise ValueError(f"the two rows must cover the same tasks, got {sorted(method)} and {sorted(reference)}")
    generator = torch.Generator().manual_seed(seed)
    observed, draws = 0.0, torch.zeros(samples, dtype=torch.float64)
    for task in sorted(method):
        a = torch.tensor(method[task], dtype=torch.float64)
        b = torch.tensor(reference[task], dtype=torch.float64)
        if a.numel() != b.numel() or a.numel() == 0:
            raise ValueError(f"task {task}: {a.numel()} answers against {b.numel()}: pair the same examples")
        differences = a - b
        observed += differences.mean().item()
        picks = torch.randint(differences.numel(), (samples, differences.numel()), generator=generator)
        draws += differences[picks].mean(dim=1)
    tasks = len(method)
    low, high = torch.quantile(draws / tasks, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
    return {"difference": observed / tasks, "low": low, "high": high}
