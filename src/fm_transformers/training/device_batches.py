"""Training batches made on the device: positives from the stored CSR, negatives sampled, padded and gathered there.

The host only plans: from each staged part's small host copies (CSR pointers, visible chunks, shuffled rows) it
knows every sample's candidate counts, hence every batch's padded width, without waiting for the device. The
device then draws the negatives of a whole block of batches at once (uniform noise over each sample's visible
chunks, positives and unseen chunks pushed to the end, the smallest `negatives` kept: a uniform draw without
replacement) and lays each row out as the host reference does (positives in stored order, then negatives, then
padding); each batch is then a slice of the block, and its candidates' keys one index into its part's keys
tensor. Working a block at a time divides the launches a batch costs by about the block size. The draw is a
function of (seed, epoch, block), and a run that starts inside a block rebuilds the whole block, so a resumed run
draws what an uninterrupted one would have. All of this runs on a thread of its own (producer.py), which hands
the training thread finished batches: the step is host-bound, so that thread must only launch the step.
dataset.py holds the host reference it is tested against.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch
from torch.profiler import record_function

from .order import EpochOrder, Segment, seed_from
from .producer import produced_batches
from .shards import LabelShards
from .staging import PartStager, StagedPart
from .step import TriggerBatch

BATCHES_PER_BLOCK = 8


def negative_counts(positives: torch.Tensor, visible: torch.Tensor, ratio: float) -> torch.Tensor:
    """Negatives per sample: `ratio` per positive (per one when there are none), at most the free chunks."""
    wanted = torch.round(ratio * positives.clamp(min=1).double()).long()
    return torch.minimum(visible - positives, wanted)


@dataclass(frozen=True)
class SampleCounts:
    """Host copies of each sample's set sizes, in sample order: what planning needs, without the device."""

    positives: torch.Tensor  # (samples,)
    negatives: torch.Tensor
    visible: torch.Tensor


def sample_counts(indptr: torch.Tensor, visible: torch.Tensor, rows: torch.Tensor, ratio: float) -> SampleCounts:
    """From host tensors: CSR pointers (triggers + 1,), visible chunks (triggers,), trigger rows (samples,)."""
    positives = indptr[rows + 1] - indptr[rows]
    return SampleCounts(positives, negative_counts(positives, visible[rows], ratio), visible[rows])


def device_batches(
    shards: LabelShards,
    layers: list[int],
    order: EpochOrder,
    start: int,
    negative_ratio: float,
    device: torch.device,
    prefetch: int = 2,
    block: int = BATCHES_PER_BLOCK,
) -> Iterator[TriggerBatch]:
    """This process's batches `start`.. of the epoch in `order`, made on `device`, `block` batches at a time, on a
    producer thread: the batches of block_batches, each tensor owning its storage."""
    make = partial(block_batches, shards, layers, order, start, negative_ratio, device, prefetch, block)
    return produced_batches(make, device)


def block_batches(
    shards: LabelShards,
    layers: list[int],
    order: EpochOrder,
    start: int,
    negative_ratio: float,
    device: torch.device,
    prefetch: int = 2,
    block: int = BATCHES_PER_BLOCK,
) -> Iterator[TriggerBatch]:
    """device_batches made on the calling thread, as they come out of their block (positions, hidden states,
    targets and mask are views into it): what the producer thread runs."""
    first_block = start // block * block
    stager = PartStager(shards, layers, device, prefetch)
    staged = stager.stream(_jobs(order, first_block))
    generator = torch.Generator(device)
    resident: dict[int, StagedPart] = {}  # order_position -> part; only the parts of the current block
    try:
        for first in range(first_block, len(order), block):
            indices = range(first, min(first + block, len(order)))
            batches = [order.batch(index) for index in indices]
            positions = [segment.order_position for segments in batches for segment in segments]
            _hold(resident, staged, min(positions), max(positions))
            generator.manual_seed(seed_from(order.seed, order.epoch, order.rank, first))
            yield from make_batches(batches, resident, layers, negative_ratio, generator, skip=max(start - first, 0))
    finally:
        stager.close()


def _hold(resident: dict[int, StagedPart], staged: Iterator[StagedPart], first: int, last: int) -> None:
    """Keep in `resident` the parts at order positions first..last: drop the earlier ones before taking the next
    from `staged`, so that no more than one block's parts are ever held."""
    for position in [position for position in resident if position < first]:
        del resident[position]
    while max(resident, default=-1) < last:
        part = next(staged)
        part.wait()
        resident[part.order_position] = part


def _jobs(order: EpochOrder, start: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    """The parts batches `start`.. touch, each once, in order: (part, order_position, shuffled rows)."""
    last = -1
    for index in range(start, len(order)):
        for segment in order.batch(index):
            if segment.order_position > last:
                last = segment.order_position
                yield segment.part, last, order.rows(last)


def make_batches(
    batches: list[list[Segment]],
    parts: dict[int, StagedPart],
    layers: list[int],
    ratio: float,
    generator: torch.Generator,
    skip: int = 0,
) -> Iterator[TriggerBatch]:
    """The batches of one block but the first `skip`, each padded to its own longest candidate set as the host
    reference pads. The block's candidates are drawn at once; each batch's keys are gathered only when it is
    asked for, so one batch's keys are held at a time, not a block's. The profiler ranges name the two stages in
    a trace."""
    with record_function("loader: draw block"):
        runs = _merge([segment for segments in batches for segment in segments])
        counts = [sample_counts(*_host(parts[run.order_position]), run.rows, ratio) for run in runs]
        totals = torch.cat([count.positives + count.negatives for count in counts])  # (block samples,)
        width = max(1, int(totals.max()))
        pieces = [
            _run_tensors(parts[run.order_position], run, layers, ratio, width, count, generator)
            for run, count in zip(runs, counts, strict=True)
        ]
        block = {name: _cat([piece[name] for piece in pieces]) for name in pieces[0]}
    row = 0
    for index, segments in enumerate(batches):
        size = sum(segment.end - segment.start for segment in segments)
        if index >= skip:
            with record_function("loader: gather batch"):
                batch = _slice(block, segments, parts, layers, row, int(totals[row : row + size].max()))
            yield batch
        row += size


def _slice(block: dict, segments: list[Segment], parts: dict[int, StagedPart], layers, row: int, width: int):
    """The batch of `segments`, whose samples are block rows row.., with its keys gathered from their parts."""
    rows, columns = slice(row, row + sum(segment.end - segment.start for segment in segments)), slice(0, max(1, width))
    keys = {layer: [] for layer in layers}
    for segment in segments:
        candidates = block["candidates"][row : row + segment.end - segment.start, columns]
        row += segment.end - segment.start
        for layer in layers:
            keys[layer].append(parts[segment.order_position].device[f"keys/{layer}"][candidates])
    return TriggerBatch(
        positions=block["positions"][rows],
        hidden={layer: block[f"hidden/{layer}"][rows] for layer in layers},
        keys={layer: _cat(gathered) for layer, gathered in keys.items()},  # (batch, width, head_dim)
        targets=block["targets"][rows, columns],
        mask=block["mask"][rows, columns],
    )


def _merge(segments: list[Segment]) -> list[Segment]:
    """Consecutive segments of one part that continue each other, as one (a block's batches share parts)."""
    merged = [segments[0]]
    for segment in segments[1:]:
        last = merged[-1]
        if segment.order_position == last.order_position and segment.start == last.end:
            rows = torch.cat([last.rows, segment.rows])
            merged[-1] = Segment(last.part, last.order_position, last.start, segment.end, rows)
        else:
            merged.append(segment)
    return merged


def _host(part: StagedPart) -> tuple[torch.Tensor, torch.Tensor]:
    return part.host["labels/indptr"], part.host["visible"]


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _run_tensors(part: StagedPart, run: Segment, layers, ratio, width, counts: SampleCounts, generator) -> dict:
    """Per-sample tensors of one run of a part's rows: candidates, targets, mask (samples, width), positions,
    hidden states."""
    data = part.device
    rows = data["rows"][run.start : run.end]  # (samples,)
    candidates, targets, mask = candidate_sets(
        data["labels/indptr"],
        data["labels/indices"],
        data["visible"],
        rows,
        ratio,
        width,
        int(counts.visible.max()),
        int(counts.negatives.max()),
        generator,
    )
    if "key_base" in data:  # a group of parts (read_groups.py): chunk ids of each document, keys end to end
        candidates = candidates + data["key_base"][rows][:, None]
    hidden = {f"hidden/{layer}": data[f"hidden/{layer}"][rows] for layer in layers}
    return {"candidates": candidates, "targets": targets, "mask": mask, "positions": data["positions"][rows], **hidden}


def candidate_sets(
    indptr: torch.Tensor,
    indices: torch.Tensor,
    visible: torch.Tensor,
    rows: torch.Tensor,
    ratio: float,
    width: int,
    max_visible: int,
    max_negatives: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(candidates int64, targets, mask), each (samples, width), for trigger rows `rows`, all on one device.

    indptr (triggers + 1,) and indices (positives + 1,) are the CSR positives with one spare entry at the end,
    so that reads at padded slots stay in bounds; visible (triggers,). max_visible and max_negatives over `rows`
    come from the host (sample_counts). Row layout: positives in stored order, then negatives, then padding
    (candidate 0, mask 0).
    """
    first = indptr[rows]
    positives = indptr[rows + 1] - first  # (samples,)
    seen = visible[rows]
    negatives = negative_counts(positives, seen, ratio)
    column = torch.arange(width, device=rows.device)  # (width,)
    is_positive = column < positives[:, None]  # (samples, width)
    positive_ids = indices[(first[:, None] + column).clamp(max=indices.numel() - 1)]
    drawn = _draw_negatives(positive_ids, is_positive, seen, max_visible, max_negatives, generator)
    slot = (column - positives[:, None]).clamp(0, max(max_negatives - 1, 0))
    is_negative = (column >= positives[:, None]) & (column < (positives + negatives)[:, None])
    candidates = torch.where(is_positive, positive_ids, torch.where(is_negative, drawn.gather(1, slot), 0))
    return candidates, is_positive.float(), (is_positive | is_negative).float()


def _draw_negatives(positive_ids, is_positive, visible, max_visible: int, count: int, generator) -> torch.Tensor:
    """(samples, max(count, 1)) chunk ids: per row, a uniform random order of its visible non-positive chunks, cut
    to `count`; rows with fewer free chunks than `count` end in chunks that the caller masks out."""
    if count == 0:
        return positive_ids.new_zeros(positive_ids.shape[0], 1)
    noise = torch.rand(positive_ids.shape[0], max_visible + 1, generator=generator, device=positive_ids.device)
    unseen = torch.arange(max_visible + 1, device=noise.device) >= visible[:, None]
    noise = noise.masked_fill(unseen, 2.0)  # column max_visible is always unseen: a sink for padded slots
    noise.scatter_(1, torch.where(is_positive, positive_ids, max_visible), 2.0)
    return noise.topk(count, dim=1, largest=False).indices
