"""Synthetic "needle in filler" documents, for running the whole training pipeline offline on a tiny backbone.

A document is one filler token repeated, with random needles (one compressed chunk of random tokens) scattered
over it. Filler chunks all carry the same content, so a native indexer can tell them apart only by position;
needle chunks each carry their own. Whatever a random native indexer prefers, it prefers it for every filler
query of the window, so its picks depend on content in a way that a trained memory indexer can learn and a
recency rule cannot: the tests and the example use this to check that training learns something real.
"""

import json
from pathlib import Path

import torch

from ..tiny import SPECIAL_TOKENS, TINY_VOCAB_SIZE


def needle_documents(
    count: int,
    length: int,
    seed: int = 0,
    needle_rate: float = 0.12,
    chunk: int = 4,
    filler_token: int = len(SPECIAL_TOKENS),
    vocab_size: int = TINY_VOCAB_SIZE,
) -> list[dict]:
    """`count` documents of `length` token ids as JSONL records {"id", "input_ids"}; a seed fixes them all.

    chunk: the backbone's compress rate, so that each needle fills exactly one compressed chunk.
    Needle tokens are drawn from the ids after the special tokens, up to `vocab_size` (the tiny backbone's).
    """
    generator = torch.Generator().manual_seed(seed)
    documents = []
    for index in range(count):
        ids = torch.full((length,), filler_token, dtype=torch.long)
        needles = (torch.rand(length // chunk, generator=generator) < needle_rate).nonzero().flatten()
        for start in (needles * chunk).tolist():
            ids[start : start + chunk] = torch.randint(len(SPECIAL_TOKENS), vocab_size, (chunk,), generator=generator)
        documents.append({"id": f"needle-{seed}-{index}", "input_ids": ids.tolist()})
    return documents


def write_jsonl(path: str | Path, records: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path
