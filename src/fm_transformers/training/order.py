"""The order in which an epoch visits trigger steps, and which of them each optimizer step takes.

Reading a part of a document costs far more than one sample, so an epoch visits one part at a time: the parts
are shuffled, then the trigger steps inside each part, and consecutive samples share a part. Batches are
consecutive runs of `batch_size` samples of that stream (the last one of an epoch may be shorter); with several
processes, process r takes batches r, r + world, ... and the few left over at the end of an epoch are dropped,
so that every process makes the same number of steps.

Everything is a function of (seed, epoch) and the part sizes, computed on demand: batch i can be found without
walking batches 0..i-1 (a resumed run starts there), and nothing grows with the number of trigger steps. The
per-part bookkeeping is kept in Python lists: the loader looks a batch up twice a step on the thread that
launches the training step, and a lookup by tensor ops (a search and a few scalar reads) costs several times
more host time than one by bisect.
"""

from bisect import bisect_right
from dataclasses import dataclass
from itertools import accumulate

import torch


@dataclass(frozen=True)
class Segment:
    """The samples a batch takes from one part: its trigger rows `rows`, the slice [start, end) of the part's
    shuffled rows (EpochOrder.rows)."""

    part: int  # index into LabelShards.parts
    order_position: int  # where the part comes in the epoch's order (increases along an epoch)
    start: int
    end: int
    rows: torch.Tensor  # (end - start,) int64, in visiting order


class EpochOrder:
    """Visiting order of one epoch, for one of `world` processes."""

    def __init__(
        self, part_triggers: list[int], batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1
    ):
        self.batch_size = batch_size
        self.seed, self.epoch, self.rank, self.world = seed, epoch, rank, world
        generator = torch.Generator().manual_seed(seed_from(seed, epoch))
        self.parts: list[int] = torch.randperm(len(part_triggers), generator=generator).tolist()  # visiting order
        self.ends = list(accumulate(part_triggers[part] for part in self.parts))  # samples through each part
        self.samples = self.ends[-1] if self.ends else 0
        self._rows: dict[int, torch.Tensor] = {}  # the last parts' rows: consecutive batches share a part

    def __len__(self) -> int:
        """Batches this process takes in the epoch."""
        return -(-self.samples // self.batch_size) // self.world

    def batch(self, index: int) -> list[Segment]:
        """Segments of this process's batch `index` (0 <= index < len(self))."""
        start = (index * self.world + self.rank) * self.batch_size
        end = min(start + self.batch_size, self.samples)
        first = bisect_right(self.ends, start)
        segments = []
        for position in range(first, len(self.parts)):
            part_start = self._start(position)
            if part_start >= end:
                break
            first_row, end_row = max(start - part_start, 0), min(end, self.ends[position]) - part_start
            rows = self.rows(position)[first_row:end_row]
            segments.append(Segment(self.parts[position], position, first_row, end_row, rows))
        return segments

    def rows(self, position: int) -> torch.Tensor:
        """The shuffled trigger rows of the part at `position` of the order (a function of seed, epoch, part). Safe
        to call from the producer threads of several loaders that share this order: the cache is only a cache."""
        rows = self._rows.get(position)
        if rows is None:
            generator = torch.Generator().manual_seed(seed_from(self.seed, self.epoch, self.parts[position]))
            count = self.ends[position] - self._start(position)
            rows = torch.randperm(count, generator=generator)
            if len(self._rows) >= 4:
                self._rows.pop(min(self._rows), None)
            self._rows[position] = rows
        return rows

    def _start(self, position: int) -> int:
        """Samples before the part at `position` of the order."""
        return self.ends[position - 1] if position else 0


def seed_from(*values: int) -> int:
    """A generator seed from several integers (Python's tuple hash is fixed for ints across runs)."""
    return hash(values) & 0x7FFF_FFFF_FFFF_FFFF
