"""Recency and random baselines that hold, example by example and recall by recall, the bytes LSA held.

LSA runs uncapped, so its resident set has another size at every recall and in every sequence. A
`RecordingPolicy` around its policy writes those sizes down (computed by the cache's own rule,
`policies.resident_sets`); `matched_counts` turns them into chunk counts of equal bytes; a `MatchedPolicy` then
keeps exactly that many chunks: the newest ones, or random ones, besides the same recency tail and sink.

Equal bytes, not equal chunks: LSA keeps its target layers' index keys for the whole history on the device (its
level 1 scores them), a recency or random cache keeps only resident ones. Per sequence, with C CSA layers, G of
them target layers, KV entries of `kv` values and index keys of `ix`, T chunks made and r resident, LSA holds
C (kv + ix) r + G ix (T - r) values besides the tail, which both hold alike; a baseline holding m chunks holds
C (kv + ix) m. So m = r + floor(G ix (T - r) / (C (kv + ix))): at most one chunk's bytes below LSA's.
"""

import torch

from ..config import LSAConfig
from ..policies import NOT_WANTED, ResidentPolicy, SelectionContext, resident_sets

MATCHED_KINDS = ("recency", "random")


class RecordingPolicy(ResidentPolicy):
    """`inner` unchanged; `recorded[trigger] = (chunks made, resident chunks of each sequence)`. The priorities
    are kept as they are and sized after the run, so the recording adds no host wait to the run it records."""

    def __init__(self, inner: ResidentPolicy, config: LSAConfig):
        self.inner, self.config = inner, config
        self.target_layers = inner.target_layers
        self._seen: dict[int, tuple[torch.Tensor, SelectionContext]] = {}

    def observe(self, layer_idx, hidden_states, position_ids, index_keys):
        self.inner.observe(layer_idx, hidden_states, position_ids, index_keys)

    def priorities(self, context):
        priorities = self.inner.priorities(context)
        self._seen[context.trigger_index] = (priorities, context)  # a later prefill forward overwrites
        return priorities

    @property
    def recorded(self) -> dict[int, tuple[int, list[int]]]:
        return {
            trigger: (context.num_chunks, [ids.numel() for ids in resident_sets(priorities, context, self.config)])
            for trigger, (priorities, context) in self._seen.items()
        }


def matched_counts(
    recorded: dict[int, tuple[int, list[int]]], csa_layers: int, target_layers: int, kv: int, ix: int
) -> list[list[int]]:
    """Per trigger (in order), per sequence: the chunks a baseline keeps to hold LSA's bytes (see above)."""
    per_chunk = csa_layers * (kv + ix)
    return [
        [min(chunks, r + target_layers * ix * (chunks - r) // per_chunk) for r in sizes]
        for _, (chunks, sizes) in sorted(recorded.items())
    ]


class MatchedPolicy(ResidentPolicy):
    """Keeps `counts[trigger][sequence]` chunks in all, the config's recency tail and sink among them, the rest
    the newest ("recency") or drawn at random ("random", seeded)."""

    def __init__(self, kind: str, counts: list[list[int]], config: LSAConfig, seed: int = 0):
        if kind not in MATCHED_KINDS:
            raise ValueError(f"kind must be one of {MATCHED_KINDS}, got {kind!r}")
        self.kind, self.counts, self.config = kind, counts, config
        self.generator = torch.Generator().manual_seed(seed)

    def priorities(self, context: SelectionContext) -> torch.Tensor:
        if context.trigger_index >= len(self.counts):
            raise RuntimeError(
                f"trigger {context.trigger_index} has no recorded LSA size ({len(self.counts)} recorded): run the "
                "matched row on the examples and token count LSA ran"
            )
        chunks = context.num_chunks
        ids = torch.arange(chunks)
        forced = (ids >= chunks - self.config.recency_chunks) | (ids < self.config.sink_chunks)
        free = ids[~forced]  # (free,)
        out = torch.full((context.batch_size, chunks), NOT_WANTED)
        for row, count in enumerate(self.counts[context.trigger_index]):
            room = max(0, min(count - int(forced.sum()), free.numel()))
            if self.kind == "recency":
                chosen = free[free.numel() - room :]
            else:
                chosen = free[torch.randperm(free.numel(), generator=self.generator)[:room]]
            out[row, chosen] = chosen.float()
        return out.to(context.device)
