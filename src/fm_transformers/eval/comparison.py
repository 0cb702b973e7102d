"""Runs the rows (methods.py) over the same examples and records, example by example, what each row answered and
what it cost.

Batches share task, context length and answer length (compare.example_batches), and every row decodes a batch
before the next batch starts, in row order, so rows that read an earlier row's run (`shared`) find it. Each
generation is greedy and writes exactly as many tokens as the answer has (EOS is not allowed to end it early), so
every row runs the same number of decode steps and level-1 triggers. A record per example and row:
- correct: exact match; tokens_right: answer tokens written at their place; tokens: the answer's length (the
  tokens generated);
- triggers: level-1 recalls of the generation (cache.trigger_count; None for the stock cache);
- chunks_fetched: chunks brought from the host pool, summed over CSA layers (memory_report()["chunks_fetched"]);
- refreshes, refresh_checks, refresh_scored_chunks: the native-paging rows' recalls inside the window, the refresh
  layers' whole-history scorings, and the chunks those scored;
- csa_device_bytes, full_csa_bytes: CSA compressed KV and index keys on the device at the end, and in the stock
  cache (read off the tensors);
- prefill_peak_bytes, decode_peak_bytes: the allocator's peaks above what was allocated before (CUDA; None
  elsewhere); host_syncs: CUDA sync-debug count (None elsewhere); seconds: wall time.
Batch-level measures (bytes, peaks, syncs, time, fetches) are shared out evenly over the batch's examples.
"""

import time
from contextlib import nullcontext

import torch
from tqdm.auto import tqdm

from ..decode_graph import DecodeGraph
from ..report import stock_csa_bytes
from .compare import example_batches
from .measures import host_syncs, phase_peaks
from .methods import PagingCache, Row
from .oracle import NativePicks
from .tasks import Example, exact_match, tokens_right
from .vocab import EOS, PAD

MEASURES = (
    "triggers", "chunks_fetched", "refreshes", "refresh_checks", "refresh_scored_chunks", "csa_device_bytes",
    "full_csa_bytes", "prefill_peak_bytes", "decode_peak_bytes", "host_syncs", "seconds",
)


def generate(model, input_ids: torch.Tensor, new_tokens: int, cache=None) -> tuple[torch.Tensor, object]:
    """Greedy decoding of exactly `new_tokens` tokens; returns them (batch, new_tokens) and the cache."""
    output = model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), past_key_values=cache, do_sample=False,
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=PAD, eos_token_id=EOS,
        return_dict_in_generate=True,
    )
    return output.sequences[:, input_ids.shape[1] :], output.past_key_values


def decode_batch(
    model, row: Row, input_ids: torch.Tensor, new_tokens: int, shared: dict, graph: bool | None = None
) -> tuple[torch.Tensor, dict]:
    """One row's generation of one batch: the tokens and the batch's measures (totals over the batch).

    graph: decode LSA caches without refresh layers through decode_graph.DecodeGraph, captured on CUDA (as
    `generate(cache_implementation="lsa")` does there), its fixed-shape step run eagerly elsewhere; None: on
    CUDA only."""
    device = input_ids.device
    cache = row.make_cache(model, shared)
    if cache is not None and not cache.refresh_layers and (device.type == "cuda" if graph is None else graph):
        cache.decode_graph = DecodeGraph(model, cache, capture=device.type == "cuda", max_length=input_ids.shape[1] + new_tokens)
    picks = NativePicks(model) if cache is None else None
    start = time.perf_counter()
    with phase_peaks(model) as peaks, host_syncs(device) as syncs, picks or nullcontext():
        tokens, cache = generate(model, input_ids, new_tokens, cache)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    measures = dict.fromkeys(MEASURES)
    measures.update(seconds=seconds, prefill_peak_bytes=peaks.prefill, decode_peak_bytes=peaks.decode, host_syncs=syncs[0])
    if picks is not None:
        shared["native_steps"], shared["prompt_length"] = picks.host_steps(), input_ids.shape[1]
        measures["csa_device_bytes"] = measures["full_csa_bytes"] = stock_csa_bytes(cache, model.config.layer_types)
        return tokens, measures
    report = cache.memory_report()
    measures.update(
        triggers=cache.trigger_count * input_ids.shape[0], chunks_fetched=report["chunks_fetched"],
        refreshes=report["refreshes"] * input_ids.shape[0], csa_device_bytes=report["csa_device_bytes"],
        full_csa_bytes=report["full_csa_bytes"],
    )
    if isinstance(cache, PagingCache):
        measures.update(refresh_checks=cache.refresh_checks, refresh_scored_chunks=cache.refresh_scored_chunks)
    return tokens, measures


def run_comparison(
    model, examples: list[Example], rows: list[Row], batch_size: int = 16, progress: bool = True, graph: bool | None = None
) -> dict[str, list[dict]]:
    """{row name: one record per example, in the order of `examples`}; `graph` as in decode_batch."""
    device = next(model.parameters()).device
    position = {id(example): index for index, example in enumerate(examples)}
    records: dict[str, list[dict | None]] = {row.name: [None] * len(examples) for row in rows}
    batches = example_batches(examples, batch_size)
    for number, batch in enumerate(tqdm(batches, desc="compare", disable=not progress)):
        input_ids = torch.tensor([example.input_ids for example in batch], device=device)
        shared = {"batch": number}
        for row in rows:
            with torch.no_grad():
                tokens, measures = decode_batch(model, row, input_ids, len(batch[0].answer), shared, graph)
            for example, generated in zip(batch, tokens.tolist()):
                record = {
                    "task": example.task, "correct": exact_match(generated, example.answer),
                    "tokens_right": tokens_right(generated, example.answer), "tokens": len(example.answer),
                }
                record.update({name: None if value is None else value / len(batch) for name, value in measures.items()})
                records[row.name][position[id(example)]] = record
    return records
