"""Which training tasks does a saved evaluation backbone answer, and can it write ids it was not trained to copy?
Seconds on a CPU, where a generation-based evaluation of the long tasks takes minutes (docs/evaluation.md, third
backbone run).

    python examples/score_backbone_tasks.py runs/paper/backbone-bf16 --lengths 512,2048

Part 1: each task of the training mixes, teacher forced (one forward per batch, no generation): the answer loss
and the share of answer tokens predicted right, as the training step measures them (backbone_training.answer_loss).
Part 2: the same needle examples over the short ids, then with their keys, their values, or both renamed to ids of
the long vocabulary (vocab.VOCABULARIES): a model that finds a renamed key but cannot write a renamed value has
learned to copy only the values it was trained on. Needs a backbone of the long vocabulary (the paper sizes).
Part 3: the mean norm of the output layer's rows (and the input embedding's) per id range, beside fresh weights':
rows of ids a run never had as targets grow large (pushed down at every answer), which later training must undo.
Part 4: the long tasks' answer tokens split by what writing them takes: a lookup (the first token of an item:
which needle, the question's next key, the next hop's name) or copying on from the previous token (the rest);
lookups split again by whether the token they copy lies inside the sliding window or only in compressed entries
beyond it (qa_block's next key leaves the window from about its tenth item on; eighth backbone run).
Part 5 (--greedy N): N examples of each long task at each length (the evaluation's examples of --seed) answered
by greedy decoding with the stock cache: how many come out whole, and where and how each of the others first
goes wrong (a lookup, two neighbours swapped, or another copied token; long_tasks.first_error).
"""

import argparse
import random

import torch
from transformers import DeepseekV4ForCausalLM

from fm_transformers.eval.backbone import build_eval_backbone
from fm_transformers.eval.backbone_training import answer_loss
from fm_transformers.eval.batches import IGNORE, Batch, make_batch
from fm_transformers.eval.catalog import evaluation_examples
from fm_transformers.eval.compare import full_cache_generate
from fm_transformers.eval.long_tasks import ITEM_TOKENS, first_error, starts_item
from fm_transformers.eval.vocab import FILLER, LONG_KEYS, LONG_VALUES, LONG_VOCAB_SIZE, VOCABULARIES

ID_RANGES = {
    "short keys": VOCABULARIES["short"][0],
    "short values": VOCABULARIES["short"][1],
    "filler": FILLER,
    "long keys": LONG_KEYS,
    "long values": LONG_VALUES,
}

SCORED_TASKS = (
    ("qa_document", {}),
    ("long_needle", {}),
    ("qa_block", {}),
    ("long_chain", {}),
    ("associative_recall", {"tokens_per_pair": 16}),
    ("associative_recall", {"tokens_per_pair": 16, "vocabulary": "long"}),
    ("single_needle", {"value_len": 16}),
    ("single_needle", {"value_len": 16, "vocabulary": "long"}),
    ("associative_recall", {"tokens_per_pair": 16, "vocabulary": "long-swapped"}),
    ("single_needle", {"value_len": 16, "vocabulary": "long-swapped"}),
    ("multi_key_needle", {"value_len": 8}),
)
RENAMED_TASKS = (("single_needle", {"value_len": 16}), ("associative_recall", {"tokens_per_pair": 16}))


def task_label(task: str, options: dict) -> str:
    labels = {"long": " (long ids)", "long-swapped": " (writes key ids)"}
    return task + labels.get(options.get("vocabulary"), "")


def score(model, batch: Batch) -> tuple[float, float]:
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, use_cache=False).logits
    loss, accuracy = answer_loss(logits, batch.targets)
    return loss.item(), accuracy.item()


def lookup_and_copy(model, batch: Batch, item_tokens: int | None) -> dict[str, tuple[float, int]]:
    """Teacher-forced accuracy and count of the answer tokens that start an item, split by whether the nearest
    earlier copy of the token lies inside the sliding window, and of the others."""
    with torch.no_grad():
        predicted = model(input_ids=batch.input_ids, use_cache=False).logits.argmax(-1)
    answered = batch.targets != IGNORE
    right = (predicted == batch.targets) & answered
    index = answered.cumsum(1) - 1  # position within the answer
    starts = answered & starts_item(index, item_tokens)
    near = starts & source_in_window(batch, starts, model.config.sliding_window)
    return {
        name: (right[mask].float().mean().item() if mask.any() else float("nan"), int(mask.sum()))
        for name, mask in (("lookup-near", near), ("lookup-far", starts & ~near), ("copy", answered & ~starts))
    }


def source_in_window(batch: Batch, positions: torch.Tensor, window: int) -> torch.Tensor:
    """At each marked position t (predicting targets[t]), whether the target id occurs among the inputs the
    sliding window covers there, [t - window + 1, t]: a copy attention can reach without compressed entries."""
    input_ids, targets = batch.input_ids.cpu(), batch.targets.cpu()  # once, not a device read per lookup
    found = torch.zeros(positions.shape, dtype=torch.bool)
    for row, t in positions.nonzero().tolist():
        found[row, t] = bool((input_ids[row, max(0, t - window + 1) : t + 1] == targets[row, t]).any())
    return found.to(positions.device)


def renaming(keys: bool, values: bool, seed: int) -> torch.Tensor:
    """An id map that sends the short keys and/or values to distinct long ones and leaves every other id alone."""
    table = torch.arange(LONG_VOCAB_SIZE)
    rng = random.Random(seed)
    short_keys, short_values = VOCABULARIES["short"]
    if keys:
        table[short_keys.start : short_keys.stop] = torch.tensor(rng.sample(LONG_KEYS, len(short_keys)))
    if values:
        table[short_values.start : short_values.stop] = torch.tensor(rng.sample(LONG_VALUES, len(short_values)))
    return table


def renamed(batch: Batch, table: torch.Tensor) -> Batch:
    targets = batch.targets.clone()
    answered = targets != IGNORE
    targets[answered] = table[targets[answered]]
    return Batch(table[batch.input_ids], targets, batch.distill_rows, batch.context_length)


def row_norms(model) -> dict[str, tuple[float, float]]:
    """Per id range: the mean norm of the output layer's rows and of the input embedding's."""
    output, embedding = model.get_output_embeddings().weight, model.get_input_embeddings().weight

    def mean_norm(weight: torch.Tensor, ids: range) -> float:
        return weight[ids.start : ids.stop].norm(dim=1).mean().item()

    return {name: (mean_norm(output, ids), mean_norm(embedding, ids)) for name, ids in ID_RANGES.items()}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("backbone", help="a saved evaluation backbone (save_pretrained directory)")
    parser.add_argument("--lengths", default="512", help="comma-separated context lengths (multiples of 64)")
    parser.add_argument("--rows", type=int, default=4, help="examples per task and length")
    parser.add_argument("--seed", type=int, default=123, help="draw of the examples (training seeds are 0)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--greedy", type=int, default=0, help="part 5: long-task examples answered greedily")
    args = parser.parse_args()
    try:
        args.lengths = [int(length) for length in args.lengths.split(",")]
    except ValueError:
        parser.error(f"--lengths must be comma-separated integers, got {args.lengths!r}")
    if args.rows < 1 or args.greedy < 0 or any(length < 64 for length in args.lengths):
        parser.error("--rows must be at least 1, --greedy at least 0 and every length at least 64")
    return args


def main() -> None:
    args = parse_args()
    model = DeepseekV4ForCausalLM.from_pretrained(args.backbone, dtype=torch.float32).to(args.device).eval()
    if model.config.vocab_size < LONG_VOCAB_SIZE:
        vocab_size = model.config.vocab_size
        raise SystemExit(f"error: {args.backbone} has {vocab_size} ids; these tasks need {LONG_VOCAB_SIZE}")
    try:  # part 5's examples first: a context too short for a long task's answer is an error before any work
        greedy_examples = {
            (length, task): evaluation_examples(task, length, args.greedy, seed=args.seed)
            for length in args.lengths for task in ITEM_TOKENS
        } if args.greedy else {}
    except ValueError as error:
        raise SystemExit(f"error: --greedy: {error}") from None
    print("answer loss and answer-token accuracy, teacher forced")
    for length in args.lengths:
        for index, (task, options) in enumerate(SCORED_TASKS):
            batch = make_batch(args.seed, index, length, args.rows, ((task, options),)).to(args.device)
            loss, accuracy = score(model, batch)
            print(f"{length:6d}  {task_label(task, options):30s} loss {loss:6.3f}  accuracy {accuracy:6.1%}")
    print("\nthe same needles over the short ids, then with ids renamed to long ones")
    for length in args.lengths:
        for index, (task, options) in enumerate(RENAMED_TASKS):
            batch = make_batch(args.seed, 100 + index, length, args.rows, ((task, options),))
            for name, keys, values in (("none", False, False), ("keys", True, False), ("values", False, True),
                                       ("both", True, True)):
                loss, accuracy = score(model, renamed(batch, renaming(keys, values, args.seed)).to(args.device))
                print(f"{length:6d}  {task:20s} renamed {name:7s} loss {loss:6.3f}  accuracy {accuracy:6.1%}")
    print("\nmean row norm per id range: output layer, input embedding (fresh weights of the same config beside)")
    fresh = row_norms(build_eval_backbone(model.config, seed=0))
    for name, (output, embedding) in row_norms(model).items():
        fresh_output, fresh_embedding = fresh[name]
        print(f"{name:14s} output {output:6.3f} (fresh {fresh_output:.3f})  "
              f"embedding {embedding:6.3f} (fresh {fresh_embedding:.3f})")
    print("\nthe long tasks' answer tokens, teacher forced: lookups (an item's first token) whose token lies inside the "
          "sliding window (near) or only beyond it (far), and copying on (the rest)")
    for length in args.lengths:
        for index, (task, item_tokens) in enumerate(ITEM_TOKENS.items()):
            batch = make_batch(args.seed, 200 + index, length, args.rows, ((task, {}),)).to(args.device)
            split = lookup_and_copy(model, batch, item_tokens)
            print(f"{length:6d}  {task:12s}" + "".join(
                f"  {name} {accuracy:6.1%} of {count:4d}" for name, (accuracy, count) in split.items()))
    if args.greedy:
        print("\ngreedy answers of the long tasks (stock cache): whole, and where and how the others first go wrong")
        for (length, task), examples in greedy_examples.items():
            print(f"{length:6d}  {task:12s}  {greedy_errors(model, examples, ITEM_TOKENS[task], args.device)}")


def greedy_errors(model, examples: list, item_tokens: int | None, device: str) -> str:
    input_ids = torch.tensor([example.input_ids for example in examples], device=device)
    with torch.no_grad():
        predictions = full_cache_generate(model, input_ids, len(examples[0].answer)).tolist()
    errors = [first_error(prediction, example.answer, item_tokens) for prediction, example in
              zip(predictions, examples)]
    wrong = [error for error in errors if error is not None]
    kinds = ", ".join(f"{kind} {sum(k == kind for _, k in wrong)}" for kind in ("lookup", "swap", "copy"))
    at = ", ".join(str(index) for index, _ in wrong)
    whole = f"whole {len(errors) - len(wrong)} of {len(errors)}"
    return whole + (f"; first errors: {kinds} (at tokens {at})" if wrong else "")


if __name__ == "__main__":
    main()
