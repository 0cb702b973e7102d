"""Reading the label dump's input: JSONL documents, one JSON object a line, with "text" or "input_ids".

Documents are validated as a whole before the dump writes anything, so a bad line late in a file cannot leave
half a dataset behind.
"""

import json
from pathlib import Path

from ..document import Document


def read_jsonl(path: str | Path, tokenizer=None, max_tokens: int | None = None) -> list[Document]:
    """Parse and tokenize every document of `path`.

    tokenizer: needed only for lines with "text"; it is called without special tokens added, so the ids are
    exactly the document. max_tokens: truncate longer documents (the dump's cost grows with length squared).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"document file {path} does not exist: pass a JSONL file with one document a line")
    documents = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            documents.append(_parse(line, number, path, tokenizer, max_tokens))
    if not documents:
        raise ValueError(
            f'{path} holds no documents: write one JSON object a line, each with a "text" or "input_ids" field'
        )
    ids = [document.doc_id for document in documents]
    if len(set(ids)) != len(ids):
        raise ValueError(f'{path} has repeated document ids: give every line a unique "id" (or leave ids out)')
    return documents


def _parse(line: str, number: int, path: Path, tokenizer, max_tokens: int | None) -> Document:
    where = f"{path} line {number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where} is not valid JSON ({error.msg}): write one JSON object a line") from None
    if not isinstance(record, dict) or ("text" not in record and "input_ids" not in record):
        raise ValueError(f'{where} has neither "text" nor "input_ids": give each document one of them')
    if "input_ids" in record:
        input_ids = record["input_ids"]
        if not isinstance(input_ids, list) or not all(isinstance(i, int) and i >= 0 for i in input_ids):
            raise ValueError(f'{where}: "input_ids" must be a list of non-negative integers')
    else:
        if tokenizer is None:
            raise ValueError(f'{where} has "text" but no tokenizer was given: pass the model\'s tokenizer')
        input_ids = list(tokenizer(record["text"], add_special_tokens=False)["input_ids"])
    if max_tokens is not None:
        input_ids = input_ids[:max_tokens]
    return Document(doc_id=str(record.get("id", number)), input_ids=input_ids)
