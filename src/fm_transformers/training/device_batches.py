"""Training batches made on the device: positives from the stored CSR, negatives sampled, padded and gathered there.

The host only plans: from each staged part's small host copies (CSR pointers, visible chunks, shuffled rows) it
knows every batch's candidate counts, hence the padded width, without waiting for the device. The device then
draws the negatives of all samples at once (uniform noise over each sample's visible chunks, positives and
unseen chunks pushed to the end, the smallest `negatives` kept: a uniform draw without replacement), lays each
row out as the host reference does (positives in stored order, then negatives, then padding), and gathers the
candidates' keys with one index into the part's keys tensor. The draw is a function of (seed, epoch, batch), so a
resumed run draws what an uninterrupted one would have. dataset.py holds the host reference it is tested against.
"""

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .order import EpochOrder, Segment, seed_from
from .shards import LabelShards
from .staging import PartStager, StagedPart
from .step import TriggerBatch


def negative_counts(positives: torch.Tensor, visible: torch.Tensor, ratio: float) -> torch.Tensor:
    """Negatives per sample: `ratio` per positive (per one when there are none), at most the free chunks."""
    wanted = torch.round(ratio * positives.clamp(min=1).double()).long()
    return torch.minimum(visible - positives, wanted)


def device_batches(
    shards: LabelShards,
    layers: list[int],
    order: EpochOrder,
    start: int,
    negative_ratio: float,
    device: torch.device,
    prefetch: int = 2,
) -> Iterator[TriggerBatch]:
    """This process's batches `start`.. of the epoch in `order`, made on `device`."""
    stager = PartStager(shards, layers, device, prefetch)
    generator = torch.Generator(device)
    staged = stager.stream(_jobs(order, start))
    resident: dict[int, StagedPart] = {}  # order_position -> part; only the parts of the current batch
    try:
        for index in range(start, len(order)):
            segments = order.batch(index)
            while max(resident, default=-1) < segments[-1].order_position:
                part = next(staged)
                part.wait()
                resident[part.order_position] = part
            for position in [position for position in resident if position < segments[0].order_position]:
                del resident[position]
            generator.manual_seed(seed_from(order.seed, order.epoch, index * order.world + order.rank))
            yield make_batch(segments, resident, layers, negative_ratio, generator)
    finally:
        stager.close()


def _jobs(order: EpochOrder, start: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    """The parts batches `start`.. touch, each once, in order: (part, order_position, shuffled rows)."""
    last = -1
    for index in range(start, len(order)):
        for segment in order.batch(index):
            if segment.order_position > last:
                last = segment.order_position
                yield segment.part, last, order.rows(last)


@dataclass(frozen=True)
class SetSizes:
    """Host-side sizes of one segment's candidate sets, known without asking the device."""

    width: int  # the longest candidate set (positives + negatives)
    max_visible: int
    max_negatives: int


def set_sizes(indptr: torch.Tensor, visible: torch.Tensor, rows: torch.Tensor, ratio: float) -> SetSizes:
    """From host copies: indptr (triggers + 1,), visible (triggers,), rows (b,)."""
    positives = indptr[rows + 1] - indptr[rows]
    negatives = negative_counts(positives, visible[rows], ratio)
    return SetSizes(int((positives + negatives).max()), int(visible[rows].max()), int(negatives.max()))


def make_batch(
    segments: list[Segment], parts: dict[int, StagedPart], layers: list[int], ratio: float, generator: torch.Generator
) -> TriggerBatch:
    """One batch from its segments (one per part it takes samples from), padded to a common width."""
    sizes = []
    for segment in segments:
        host = parts[segment.order_position].host
        sizes.append(set_sizes(host["labels/indptr"], host["visible"], segment.rows, ratio))
    width = max(1, max(size.width for size in sizes))
    pieces = []
    for segment, size in zip(segments, sizes, strict=True):
        data = parts[segment.order_position].device
        rows = data["rows"][segment.start : segment.end]  # (b,)
        candidates, targets, mask = candidate_sets(
            data["labels/indptr"], data["labels/indices"], data["visible"], rows, ratio, width, size, generator
        )
        pieces.append(
            TriggerBatch(
                positions=data["positions"][rows],
                hidden={layer: data[f"hidden/{layer}"][rows] for layer in layers},
                keys={layer: data[f"keys/{layer}"][candidates] for layer in layers},  # (b, width, head_dim)
                targets=targets,
                mask=mask,
            )
        )
    if len(pieces) == 1:
        return pieces[0]
    return TriggerBatch(
        positions=torch.cat([piece.positions for piece in pieces]),
        hidden={layer: torch.cat([piece.hidden[layer] for piece in pieces]) for layer in layers},
        keys={layer: torch.cat([piece.keys[layer] for piece in pieces]) for layer in layers},
        targets=torch.cat([piece.targets for piece in pieces]),
        mask=torch.cat([piece.mask for piece in pieces]),
    )


def candidate_sets(
    indptr: torch.Tensor,
    indices: torch.Tensor,
    visible: torch.Tensor,
    rows: torch.Tensor,
    ratio: float,
    width: int,
    sizes: SetSizes,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(candidates int64, targets, mask), each (b, width), for trigger rows `rows`, all on one device.

    indptr (triggers + 1,) and indices (positives + 1,) are the CSR positives with one spare entry at the end,
    so that reads at padded slots stay in bounds; visible (triggers,). Row layout: positives in stored order,
    then negatives, then padding (candidate 0, mask 0).
    """
    first = indptr[rows]
    positives = indptr[rows + 1] - first  # (b,)
    seen = visible[rows]
    negatives = negative_counts(positives, seen, ratio)
    column = torch.arange(width, device=rows.device)  # (width,)
    is_positive = column < positives[:, None]  # (b, width)
    positive_ids = indices[(first[:, None] + column).clamp(max=indices.numel() - 1)]
    drawn = _draw_negatives(positive_ids, is_positive, seen, sizes.max_visible, sizes.max_negatives, generator)
    slot = (column - positives[:, None]).clamp(0, max(sizes.max_negatives - 1, 0))
    is_negative = (column >= positives[:, None]) & (column < (positives + negatives)[:, None])
    candidates = torch.where(is_positive, positive_ids, torch.where(is_negative, drawn.gather(1, slot), 0))
    return candidates, is_positive.float(), (is_positive | is_negative).float()


def _draw_negatives(positive_ids, is_positive, visible, max_visible: int, count: int, generator) -> torch.Tensor:
    """(b, max(count, 1)) chunk ids: per row, a uniform random order of its visible non-positive chunks, cut to
    `count`; rows with fewer free chunks than `count` end in chunks that the caller masks out."""
    if count == 0:
        return positive_ids.new_zeros(positive_ids.shape[0], 1)
    noise = torch.rand(positive_ids.shape[0], max_visible + 1, generator=generator, device=positive_ids.device)
    unseen = torch.arange(max_visible + 1, device=noise.device) >= visible[:, None]
    noise = noise.masked_fill(unseen, 2.0)  # column max_visible is always unseen: a sink for padded slots
    noise.scatter_(1, torch.where(is_positive, positive_ids, max_visible), 2.0)
    return noise.topk(count, dim=1, largest=False).indices
