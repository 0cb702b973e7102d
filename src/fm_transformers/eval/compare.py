"""Exact-match accuracy of a model on synthetic examples, through a pluggable greedy generation.

The comparison (full cache, LSA, recency-only, random) runs the same examples once per method; a method is only
a `generate_fn` that decodes with its own cache, so accuracy is computed by one function for all of them.
Examples are batched when they share task, context length and answer length: no padding is ever needed,
so every method sees exactly the tokens a single-sequence run would see.
"""

from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from .tasks import Example, exact_match
from .vocab import EOS, PAD

GenerateFn = Callable[[torch.nn.Module, torch.Tensor, int], torch.Tensor]
"""(model, input_ids (batch, context), max_new_tokens) -> the generated tokens only, (batch, <= max_new_tokens)."""


def full_cache_generate(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding with the stock DeepSeek-V4 cache: the reference every other method is measured against."""
    output = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=PAD,
        eos_token_id=EOS,
    )
    return output[:, input_ids.shape[1] :]


def example_batches(examples: Sequence[Example], batch_size: int) -> list[list[Example]]:
    """Batches of examples that share task, context length and answer length (no padding), in order."""
    groups: dict[tuple[str, int, int], list[Example]] = {}
    for example in examples:
        groups.setdefault((example.task, len(example.input_ids), len(example.answer)), []).append(example)
    return [group[i : i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]


def evaluate_accuracy(
    model: torch.nn.Module,
    examples: Sequence[Example],
    generate_fn: GenerateFn = full_cache_generate,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, float]:
    """Per-task exact-match accuracy (fraction in [0, 1]), tasks in order of first appearance."""
    if not examples:
        raise ValueError("no examples to evaluate")
    device = next(model.parameters()).device
    correct: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for batch in tqdm(example_batches(examples, batch_size), desc="evaluate", disable=not progress, leave=False):
        input_ids = torch.tensor([example.input_ids for example in batch], device=device)
        with torch.no_grad():
            generated = generate_fn(model, input_ids, len(batch[0].answer)).tolist()
        for prediction, example in zip(generated, batch):
            correct[example.task] += exact_match(prediction, example.answer)
            total[example.task] += 1
    return {task: correct[task] / total[task] for task in dict.fromkeys(example.task for example in examples)}


def format_accuracy_table(results: Mapping[int, Mapping[str, float]]) -> str:
    """A plain-text table: one row per task plus the mean, one column per context length, accuracy in %."""
    lengths = sorted(results)
    tasks = list(dict.fromkeys(task for length in lengths for task in results[length]))
    width = max(len("mean"), *(len(task) for task in tasks))
    header = "task".ljust(width) + "".join(f"{length:>10}" for length in lengths)
    lines = [header, "-" * len(header)]
    for task in tasks:
        cells = "".join(
            f"{100 * results[length][task]:>10.1f}" if task in results[length] else f"{'-':>10}" for length in lengths
        )
        lines.append(task.ljust(width) + cells)
    means = "".join(f"{100 * sum(results[n].values()) / len(results[n]):>10.1f}" for n in lengths)
    lines.append("mean".ljust(width) + means)
    return "\n".join(lines)
