"""Short parts read, staged and batched together: groups of consecutive parts of a label set.

Everything the loaders do per part (a file read, a pinned buffer, a transfer, a few dozen small launches to draw
its candidates) costs about the same for 6 trigger steps as for 600. The evaluation's question documents hold
about 6 trigger steps each at tau 64, so a batch of 256 touched about 43 parts, and on an H100 the indexer trained
at 18 steps a second. A group joins consecutive parts until it holds at least `min_triggers` trigger steps (the
trainer asks for one batch's worth), and the loaders treat a group as one part: the epoch order shuffles groups
and the trigger steps inside each. Parts of long documents hold hundreds of trigger steps and stay groups of one.
Groups are fixed (consecutive parts in the dump's order, which draws its documents independently), so the
documents that share a group share it every epoch.
"""

import torch

from .shards import LabelShards


class ReadGroups:
    """The parts of `shards` in groups; what the loaders read of it (read_part, part_triggers, compress_rate)."""

    def __init__(self, shards: LabelShards, min_triggers: int):
        if min_triggers < 1:
            raise ValueError(f"a group needs at least one trigger step, got min_triggers={min_triggers}")
        self.shards = shards
        counts = shards.part_triggers()
        self.parts: list[tuple[int, ...]] = []  # each group: indices into shards.parts
        self._triggers: list[int] = []
        group, triggers = [], 0
        for part, count in enumerate(counts):
            group.append(part)
            triggers += count
            if triggers >= min_triggers:
                self.parts.append(tuple(group))
                self._triggers.append(triggers)
                group, triggers = [], 0
        if group:
            self.parts.append(tuple(group))
            self._triggers.append(triggers)

    @property
    def compress_rate(self) -> int:
        return self.shards.compress_rate

    def part_triggers(self) -> list[int]:
        """Trigger steps of each group."""
        return list(self._triggers)

    def read_part(
        self, group: int, names: list[str] | None = None, pin_memory: bool = False
    ) -> dict[str, torch.Tensor]:
        """The group's parts as one (LabelShards.load_parts: keys end to end, "key_base" per trigger step)."""
        return self.shards.load_parts([self.shards.parts[part] for part in self.parts[group]], names, pin_memory)
