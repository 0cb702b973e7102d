"""Training batches of the synthetic tasks: what step s trains on depends only on (seed, step), so a resumed run
sees exactly the batches an uninterrupted one would, and no data-loader state needs saving.

A row is the context followed by the answer (teacher forcing); only answer tokens are predicted. The context
length grows over training (short contexts teach retrieval fast, long ones teach it at the target length),
and every batch holds about the same number of tokens, mixing the tasks of TRAINING_MIX evenly.
Positions are given as index tensors made on the CPU, so that selecting them on the GPU needs no host sync.
"""

from dataclasses import dataclass

import torch

from .catalog import training_example
from .long_tasks import LONG_TASK_NAMES
from .tasks import TASK_NAMES, example_rng
from .vocab import PAD, QUERY

# The five evaluation tasks, multi-query associative recall (tens of supervised retrievals a context, see
# tasks.associative_recall), and two needle variants with long values. An evaluation example supervises 3 to 6
# tokens; a long value supervises 8 or 16, all of them copied from the needle. Early in the curriculum the
# contexts are short and many needles sit inside the sliding window, where such copying is the induction
# pattern a model trained from scratch learns first (on CPU, a copy task left the loss plateau within ~100
# steps while sparse supervision had not after 500); the retrieval heads it forms are then needed, and
# trained, through the compressed entries as the contexts grow.
TRAINING_MIX: tuple[tuple[str, dict], ...] = (
    *((task, {}) for task in TASK_NAMES),
    *(("associative_recall", {"tokens_per_pair": 16}),) * 3,
    ("single_needle", {"value_len": 16}),
    ("multi_key_needle", {"value_len": 8}),
)
# The paper-layout backbone's mix: question documents (a question every ~320 tokens, every answer supervised),
# the long tasks at random sizes, and the copy-first tasks of the mix above (associative recall, a needle with a
# 16-token value). Without the latter the first H200 run stayed on the loss plateau for 1,100 steps: a long task's
# answer sits beyond the 64-token window even at the shortest contexts, so its retrieval has to go through CSA
# entries whose top-k is still random, while pairs inside the window teach induction first (see TRAINING_MIX).
LONG_TRAINING_MIX: tuple[tuple[str, dict], ...] = (
    *(("qa_document", {}),) * 3,
    *((task, {}) for task in LONG_TASK_NAMES),
    *(("associative_recall", {"tokens_per_pair": 16}),) * 2,
    ("single_needle", {"value_len": 16}),
)
# The paper-layout backbone's first stage: the copy-first tasks alone, at contexts that start inside the 64-token
# window. On one H200 (associative recall alone, 16-token pairs, 275-525 steps of 8,192 tokens): at 64 tokens this
# size reached 26% answer-token accuracy by step 275 and kept rising, while at 256 tokens neither it (learning rates
# 1e-3 and 3e-3) nor the "small" size left chance (about 1%); the long mix starts at 256, where it did not learn.
COPY_TRAINING_MIX: tuple[tuple[str, dict], ...] = (
    *(("associative_recall", {"tokens_per_pair": 16}),) * 2,
    ("single_needle", {"value_len": 16}),
    ("multi_key_needle", {"value_len": 8}),
)
MIXES = {"ruler": TRAINING_MIX, "long": LONG_TRAINING_MIX, "copy": COPY_TRAINING_MIX}
IGNORE = -100  # target of positions whose next token is not an answer token
LENGTH_STEP = 64  # context lengths are multiples of this (fewer distinct shapes on the GPU)


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # (batch, seq): context + answer minus its last token, PAD after
    targets: torch.Tensor  # (batch, seq): the answer token to predict at each position, IGNORE elsewhere
    distill_rows: torch.Tensor  # (rows,) flat indices into batch * seq: the positions that predict an answer token
    context_length: int

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(
            self.input_ids.to(device), self.targets.to(device), self.distill_rows.to(device), self.context_length
        )


def curriculum_length(seed: int, step: int, min_length: int, max_length: int, ramp_steps: int) -> int:
    """Uniform in [ceiling / 2, ceiling] (and >= min_length), where the ceiling grows linearly from min_length
    to max_length over the first ramp_steps steps; it moves in steps of LENGTH_STEP from min_length."""
    progress = 1.0 if ramp_steps <= 0 else min(1.0, step / ramp_steps)
    ceiling = min_length + int((max_length - min_length) * progress)
    floor = min_length + max(0, ceiling // 2 - min_length) // LENGTH_STEP * LENGTH_STEP
    rng = example_rng("length", seed, step)
    return floor + LENGTH_STEP * rng.randint(0, (ceiling - floor) // LENGTH_STEP)


def make_batch(
    seed: int, step: int, context_length: int, batch_size: int, mix: tuple[tuple[str, dict], ...] = TRAINING_MIX
) -> Batch:
    """`batch_size` examples of `context_length` tokens; the (task, options) of `mix` take turns from a random
    offset."""
    offset = example_rng("tasks", seed, step).randrange(len(mix))
    examples = []
    for i in range(batch_size):
        task, options = mix[(offset + i) % len(mix)]
        examples.append(training_example(task, context_length, example_rng("train", seed, step, i), **options))
    width = context_length + max(len(example.answer) for example in examples) - 1
    input_ids = torch.full((batch_size, width), PAD, dtype=torch.long)
    targets = torch.full((batch_size, width), IGNORE, dtype=torch.long)
    rows = torch.zeros((batch_size, width), dtype=torch.bool)
    for i, example in enumerate(examples):
        tokens = example.input_ids + example.answer[:-1]
        input_ids[i, : len(tokens)] = torch.tensor(tokens)
        last_context = len(example.input_ids) - 1
        targets[i, last_context : last_context + len(example.answer)] = torch.tensor(example.answer)
        rows[i, len(example.input_ids) - example.input_ids[::-1].index(QUERY) - 1 : len(tokens)] = True
        if example.recalled:
            recalled = torch.tensor(example.recalled)
            targets[i, recalled - 1] = input_ids[i, recalled]
            rows[i, recalled - 1] = True
    return Batch(input_ids, targets, rows.flatten().nonzero().squeeze(1), context_length)
