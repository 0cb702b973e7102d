"""From a raw label dump (every tau_raw tokens of every document) to the label set an indexer trains on: only the
triggers that carry meaning, at the tau the indexer is made for.

The dump (fm_transformers.training) triggers on a regular grid, most of it in filler. Kept here: each question's
end and every tau steps of its answer (AskedQuestion.trigger_positions), all on the grid (indexer_data.py).
A coarser tau is made from the same dump: the lookahead window [t, t + tau) of a trigger t is the union of the
raw windows starting at t, t + tau_raw, ..., so its golden chunks are the union of theirs and its native picks
the sum of theirs, each cut to the chunks that exist at t (the dump's own causality rule). That equals a dump
made at tau directly (tested), for the cost of one dump for every tau. The vote is chosen here too, where the dump
stores its votes (the most CSA layers that kept a chunk at one token of a window): the labels at vote v are the
chunks whose most layers over the widened window reach v, equal to a dump made at that vote (tested).

Beside the paper's label sets, one that departs from it (EVIDENCE): at every trigger of a question, the chunks of
that question's evidence already made there, the chunks its answer copies from. On the paper-layout backbone the
native picks wander over the filler and the paper's labels hold little of the evidence (docs/evaluation.md), while
the evidence with a recency tail keeps most answers: these labels teach an indexer that target directly. And
its narrower form (EVIDENCE_WINDOW): at each trigger only the statements that the next tau answer tokens are read
from (AskedQuestion.window_evidence_chunks), the lookahead window the paper's labels describe, not the whole
answer's evidence at every trigger of it.

The selected set is a normal label directory (manifest, shards) with the questions of its documents beside it
(QUESTIONS, read by gate.py).
"""

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from ..training import LabelShards
from ..training.labels import reduce_groups, visible_chunks
from ..training.shard_writer import ShardWriter
from ..training.shards import MANIFEST, atomic_write_json, read_header
from .qa_documents import AskedQuestion

QUESTIONS = "questions.json"
EVIDENCE = "evidence"  # the label set of each trigger's question evidence, beside the votes (int) and None
EVIDENCE_WINDOW = "evidence-window"  # the label set of the evidence each trigger's next tau answer tokens read
EVIDENCE_SETS = (EVIDENCE, EVIDENCE_WINDOW)
LabelSet = int | str | None


def select_labels(
    sources: list[Path], target: Path, questions: dict[str, tuple[AskedQuestion, ...]], tau: int,
    vote: LabelSet = None,
) -> dict:
    """Write to `target` (replacing it) the labels at the question triggers for `tau`, from the raw dumps in
    `sources` (one or more directories of one backbone and label settings), at `vote` CSA layers (None: the
    dump's own; EVIDENCE: the questions' evidence; EVIDENCE_WINDOW: the evidence of each trigger's window). Returns
    the manifest."""
    return select_label_sets(sources, {vote: target}, questions, tau)[vote]


def select_label_sets(
    sources: list[Path], targets: dict[LabelSet, Path], questions: dict[str, tuple[AskedQuestion, ...]], tau: int
) -> dict[LabelSet, dict]:
    """select_labels for several label sets in one pass over the dump (each document read and widened once; the
    sets differ only in their labels): `targets` maps a vote (None: the dump's own; EVIDENCE, EVIDENCE_WINDOW: the
    questions' evidence, whole or the window's) to its directory. Returns the manifests by label set."""
    raw = [LabelShards(source) for source in sources]
    first = raw[0]
    for other in raw[1:]:
        first.check_same_backbone(other)
        if other.manifest["labels"] != first.manifest["labels"] or other.target_layers != first.target_layers:
            raise ValueError(f"{other.directory} was dumped with other labels or layers than {first.directory}")
    raw_tau = first.manifest["labels"]["tau"]
    if tau % raw_tau:
        raise ValueError(f"tau {tau} is not a multiple of the dump's tau {raw_tau}: dump at a tau dividing it")
    for vote in targets:
        if vote not in (None, *EVIDENCE_SETS):
            _check_vote(vote, first)
    manifests = {vote: _selected_manifest(first.manifest, tau, vote) for vote in targets}
    writers = {}
    for vote, target in targets.items():
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        manifest = manifests[vote]
        writers[vote] = ShardWriter(target, manifest, manifest["shard_bytes"], manifest["docs_per_shard"])
    kept = {}
    for shards in raw:
        for index, document in enumerate(shards.documents):
            asked = questions[document.doc_id]
            positions = [p for q in asked for p in q.trigger_positions(tau)]
            evidence = question_evidence(asked, tau, shards.compress_rate, targets)
            by_vote = select_triggers(
                shards.load(index), positions, raw_tau, tau, shards.compress_rate, list(targets), evidence
            )
            for vote, selected in by_vote.items():
                writers[vote].add(document.doc_id, document.tokens, selected)
                manifests[vote]["documents"].append(document.doc_id)
            kept[document.doc_id] = [asdict(q) for q in questions[document.doc_id]]
    for vote, target in targets.items():
        writers[vote].close()
        manifests[vote]["complete"] = True
        atomic_write_json(target / MANIFEST, manifests[vote])
        (target / QUESTIONS).write_text(json.dumps(kept))
    return manifests


def _selected_manifest(raw: dict, tau: int, vote: LabelSet) -> dict:
    """The manifest of a selected label set, before its documents are written."""
    labels = {**raw["labels"], "tau": tau}
    if vote in EVIDENCE_SETS:
        labels.update(source=vote, vote=None, vote_applied=None)
    elif vote is not None:
        labels.update(vote=vote, vote_applied=vote)
    return {
        **{key: value for key, value in raw.items() if key not in ("shards", "documents")},
        "labels": labels,
        "selected": {
            "from_tau": raw["labels"]["tau"], "triggers": "each question's end and every tau steps of its answer",
        },
        "documents": [],
        "shards": [],
        "complete": False,
    }


def read_questions(directory: Path) -> dict[str, list[AskedQuestion]]:
    """The questions of a selected label set's documents, by document id."""
    stored = json.loads((Path(directory) / QUESTIONS).read_text())
    return {
        doc_id: [AskedQuestion(q["task"], q["end"], q["answer_tokens"], tuple(map(tuple, q["evidence"]))) for q in listed]
        for doc_id, listed in stored.items()
    }


def question_evidence(
    asked: tuple[AskedQuestion, ...], tau: int, compress_rate: int, label_sets
) -> dict[str, list[list[int]]]:
    """Per evidence label set among `label_sets`, the chunks of each trigger of the questions `asked` (in the
    order of their trigger_positions, question after question)."""
    evidence = {}
    if EVIDENCE in label_sets:
        evidence[EVIDENCE] = [q.evidence_chunks(compress_rate) for q in asked for _ in q.trigger_positions(tau)]
    if EVIDENCE_WINDOW in label_sets:
        evidence[EVIDENCE_WINDOW] = [chunks for q in asked for chunks in q.window_evidence_chunks(tau, compress_rate)]
    return evidence


def _check_vote(vote: int, shards: LabelShards) -> None:
    layers = len(shards.backbone["csa_layers"])
    if not 1 <= vote <= layers:
        raise ValueError(f"vote {vote} is not a number of CSA layers of this backbone (1 to {layers})")
    first = shards.documents[0].parts[0] if shards.documents else None
    if first is not None and first.prefix + "votes/indptr" not in read_header(first.path)[1]:
        raise ValueError(
            f"{shards.directory} stores no votes (dumped before they were stored): dump again to choose the vote"
        )


def select_triggers(
    data: dict, positions: list[int], raw_tau: int, tau: int, compress_rate: int, votes: list[LabelSet],
    evidence: dict[str, list[list[int]]] | None = None,
) -> dict[LabelSet, dict]:
    """One document's tensors (LabelShards.load) at the triggers `positions`, each widened to a window of tau,
    once per label set: at vote v the labels are the chunks the dump's votes hold in at least v layers (None: the
    dump's own labels; EVIDENCE or EVIDENCE_WINDOW: `evidence[label set][i]`, trigger i's chunks of that set, cut
    to those made at the trigger). Everything but the labels is the same tensors for every label set."""
    row_of = {position: row for row, position in enumerate(data["positions"].tolist())}
    steps = range(0, tau, raw_tau)
    missing = [p + step for p in positions for step in steps if p + step not in row_of]
    if missing:
        raise ValueError(f"the dump has no trigger at positions {missing[:5]}: dump with the warm-up of the questions")
    rows = torch.tensor([row_of[p] for p in positions], dtype=torch.long)
    limits = visible_chunks(torch.tensor(positions, dtype=torch.long), compress_rate)
    shared = {"positions": data["positions"][rows]}
    for name, tensor in data.items():
        if name.startswith(("hidden/", "keys/")):
            shared[name] = tensor[rows] if name.startswith("hidden/") else tensor
    groups = [[row_of[p + step] for step in steps] for p in positions]
    shared.update(_union_rows(data, "used", groups, limits))
    voting = any(vote not in (None, *EVIDENCE_SETS) for vote in votes)
    widened = _union_rows(data, "votes", groups, limits, reduce="max") if voting else None

    def labels(vote: LabelSet) -> dict:
        if vote is None:
            return _union_rows(data, "labels", groups, limits)
        if vote in EVIDENCE_SETS:
            chunks_by_trigger = (evidence or {}).get(vote)
            if chunks_by_trigger is None or len(chunks_by_trigger) != len(positions):
                raise ValueError(f"{vote} labels need each trigger's evidence chunks")
            made = zip(chunks_by_trigger, limits.tolist())
            return _chunk_rows([[c for c in chunks if c < limit] for chunks, limit in made])
        return _at_least(widened, vote)

    return {vote: {**shared, **labels(vote)} for vote in votes}


def _chunk_rows(rows: list[list[int]]) -> dict:
    """Labels CSR of the given chunk lists (each sorted, duplicates dropped)."""
    unique = [sorted(set(row)) for row in rows]
    indices = torch.tensor([chunk for row in unique for chunk in row], dtype=torch.long)
    lengths = torch.tensor([len(row) for row in unique], dtype=torch.long)
    return {"labels/indptr": _indptr(lengths), "labels/indices": indices}


def _indptr(lengths: torch.Tensor) -> torch.Tensor:
    """CSR row pointers of rows of these lengths."""
    return torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])


def _at_least(votes: dict, vote: int) -> dict:
    """Labels CSR: the chunks of the votes CSR held by at least `vote` layers."""
    kept = votes["votes/counts"] >= vote
    rows = torch.repeat_interleave(torch.arange(votes["votes/indptr"].numel() - 1), torch.diff(votes["votes/indptr"]))
    lengths = torch.bincount(rows[kept], minlength=votes["votes/indptr"].numel() - 1)
    return {"labels/indptr": _indptr(lengths), "labels/indices": votes["votes/indices"][kept]}


def _union_rows(data: dict, kind: str, groups: list[list[int]], limits: torch.Tensor, reduce: str = "sum") -> dict:
    """CSR rows that are the union of each group of `kind`'s rows (counts summed, or their max), cut below each
    limit."""
    indptr, indices = data[f"{kind}/indptr"], data[f"{kind}/indices"]
    counts = data.get(f"{kind}/counts")
    if counts is not None:
        counts = counts.long()
    out_indices, out_counts, lengths = [], [], []
    for group, limit in zip(groups, limits.tolist()):
        spans = [slice(int(indptr[row]), int(indptr[row + 1])) for row in group]
        chunks = torch.cat([indices[span] for span in spans])
        weights = torch.cat([counts[span] for span in spans]) if counts is not None else torch.ones_like(chunks)
        keep = chunks < limit
        unique, inverse = torch.unique(chunks[keep], return_inverse=True)
        out_indices.append(unique)
        out_counts.append(reduce_groups(weights[keep], inverse, unique.numel(), reduce))
        lengths.append(unique.numel())
    result = {
        f"{kind}/indptr": _indptr(torch.tensor(lengths, dtype=torch.long)),
        f"{kind}/indices": torch.cat(out_indices) if out_indices else indices[:0],
    }
    if counts is not None:
        result[f"{kind}/counts"] = torch.cat(out_counts) if out_counts else counts[:0]
    return result
