"""The label dump in blocks of documents, each its own label directory, so that a dump of thousands of documents
runs as commands of bounded time: a block that is complete is skipped, an unfinished one resumes where the dump
stopped (fm_transformers.training.dump_labels resumes per document), and no block starts after the deadline.
label_selection.select_labels joins the blocks.
"""

import time
from pathlib import Path

import torch

from ..document import Document
from ..training import DumpConfig, dump_labels
from ..training.shards import MANIFEST, read_manifest


def block_directories(directory: Path, count: int, block_size: int) -> list[Path]:
    return [Path(directory) / f"block-{index:04d}" for index in range(-(-count // block_size))]


def is_complete(directory: Path) -> bool:
    return (directory / MANIFEST).is_file() and read_manifest(directory)["complete"]


def dump_in_blocks(
    model, documents: list[Document], directory: Path, config: DumpConfig, name_or_path: str,
    block_size: int = 250, max_minutes: float | None = None,
) -> bool:
    """Dump `documents` into blocks of `block_size` under `directory`; True once every block is complete, False
    when `max_minutes` passed first (run again to go on)."""
    deadline = None if max_minutes is None else time.monotonic() + 60 * max_minutes
    blocks = block_directories(directory, len(documents), block_size)
    for index, block in enumerate(blocks):
        if is_complete(block):
            continue
        if deadline is not None and time.monotonic() > deadline:
            return False
        with torch.no_grad():
            dump_labels(model, documents[index * block_size : (index + 1) * block_size], block, config, name_or_path)
    return True
