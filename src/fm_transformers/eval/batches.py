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
from .restricted_candidates import CandidateDraw
from .tasks import TASK_NAMES, example_rng
from .vocab import LONG_VOCAB_SIZE, PAD, QUERY, VOCAB_SIZE

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
# The paper-layout backbone's stages, each from the weights of the one before (docs/evaluation.md, fourth and
# fifth runs). Measured on one H200 at 16K tokens a step: associative recall alone at 64 tokens learns to copy
# within ~150-200 steps (long ids, output layer tied to the input embedding: 75% of answer tokens by step 400);
# the copy mix below never left chance from fresh weights, but from a model that copies it learned. A model
# writes only the ids it was trained to write as answers: untied, the 128 short values and no long one (third
# run); tied, the long values and no key id (fifth run), yet qa_block's next keys and long_chain's names are key
# ids. So every stage copies in both roles: over the long vocabulary, and over it swapped (keys drawn from the
# long values, values from the long keys). With both, the long stage writes key ids as well as values: long_chain,
# all key ids, 99.8% of answer tokens at 2K, teacher forced (sixth run).
LONG_ID_RECALL = ("associative_recall", {"tokens_per_pair": 16, "vocabulary": "long"})
KEY_ID_RECALL = ("associative_recall", {"tokens_per_pair": 16, "vocabulary": "long-swapped"})
RECALL_TRAINING_MIX: tuple[tuple[str, dict], ...] = (LONG_ID_RECALL, KEY_ID_RECALL)
# Copying over the long tasks' ids in both roles, associative recall over the 256 short ids, and the long tasks
# themselves at the sizes that fit half the context (at 64 tokens: a 4-token value, one question, one hop);
# contexts of 64-512 tokens.
LONG_COPY_TASKS: tuple[tuple[str, dict], ...] = (
    LONG_ID_RECALL,
    KEY_ID_RECALL,
    ("single_needle", {"value_len": 16, "vocabulary": "long"}),
    ("single_needle", {"value_len": 16, "vocabulary": "long-swapped"}),
)
COPY_TRAINING_MIX: tuple[tuple[str, dict], ...] = (
    *LONG_COPY_TASKS,
    ("associative_recall", {"tokens_per_pair": 16}),
    *((task, {}) for task in LONG_TASK_NAMES),
)
# Then question documents (a question every ~320 tokens, every answer supervised), the long tasks at random
# sizes, and the long-id copy tasks, which keep the copying in use as the contexts grow to 2K.
LONG_TRAINING_MIX: tuple[tuple[str, dict], ...] = (
    *(("qa_document", {}),) * 3,
    *((task, {}) for task in LONG_TASK_NAMES),
    *LONG_COPY_TASKS,
)
MIXES = {"ruler": TRAINING_MIX, "recall": RECALL_TRAINING_MIX, "copy": COPY_TRAINING_MIX, "long": LONG_TRAINING_MIX}
# The vocabulary a backbone needs for each mix: the long tasks' ids go up to LONG_VOCAB_SIZE.
MIX_VOCAB_SIZES = {"ruler": VOCAB_SIZE, "recall": LONG_VOCAB_SIZE, "copy": LONG_VOCAB_SIZE, "long": LONG_VOCAB_SIZE}
IGNORE = -100  # target of positions whose next token is not an answer token
LENGTH_STEP = 64  # context lengths are multiples of this (fewer distinct shapes on the GPU)


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # (batch, seq): context + answer minus its last token, PAD after
    targets: torch.Tensor  # (batch, seq): the answer token to predict at each position, IGNORE elsewhere
    distill_rows: torch.Tensor  # (rows,) flat indices into batch * seq: the positions that predict an answer token
    context_length: int
    # LSA-restricted training (restricted_candidates.py), None without it: (batch, seq // rate) bool, the chunks
    # an example's answer rows may pick; (batch,) the first of those rows (seq for an unrestricted example)
    candidate_chunks: torch.Tensor | None = None
    restricted_from: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "Batch":
        moved = [None if t is None else t.to(device) for t in (self.candidate_chunks, self.restricted_from)]
        return Batch(
            self.input_ids.to(device), self.targets.to(device), self.distill_rows.to(device), self.context_length,
            *moved,
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
    seed: int,
    step: int,
    context_length: int,
    batch_size: int,
    mix: tuple[tuple[str, dict], ...] = TRAINING_MIX,
    candidates: CandidateDraw | None = None,
) -> Batch:
    """`batch_size` examples of `context_length` tokens; the (task, options) of `mix` take turns from a random
    offset. `candidates` draws each example's LSA restriction from a generator of its own (the examples are
    those of the same batch without it)."""
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
    distill_rows = rows.flatten().nonzero().squeeze(1)
    if candidates is None:
        return Batch(input_ids, targets, distill_rows, context_length)
    chunk_mask = torch.zeros((batch_size, width // candidates.compress_rate), dtype=torch.bool)
    restricted_from = torch.full((batch_size,), width, dtype=torch.long)
    for i, example in enumerate(examples):
        kept = candidates.draw(example, chunk_mask.shape[1], example_rng("candidates", seed, step, i))
        if kept is not None:  # the first answer token comes from the prefill, unrestricted as LSA serves it
            chunk_mask[i, kept] = True
            restricted_from[i] = len(example.input_ids)
    return Batch(input_ids, targets, distill_rows, context_length, chunk_mask, restricted_from)
