"""A tokenized document: the unit the label dump reads (training/) and the evaluation's indexer data writes
(eval/), kept below both so that neither imports the other."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Document:
    """One tokenized document; `doc_id` is its "id" field if it has one, else its line number."""

    doc_id: str
    input_ids: list[int]
