"""Training batches made on a thread of their own and handed, finished, to the thread that launches the step.

Why: at release sizes the training step is host-bound (one H200, batch 64: the GPU busy about a third of the
time), so a step lasts as long as its thread takes to launch it, and every op the loader launches from that
thread (drawing a block's negatives, gathering a batch's keys, copying the views the compiled step needs) adds
to the step. A producer thread does all of that instead, on a CUDA stream of its own, and puts each finished
batch in a short queue with an event recorded after its work; the training thread only takes the next batch,
makes its stream wait on the event, and marks the batch's tensors as used on its stream (record_stream) so that
the caching allocator does not hand their memory out before the step's kernels have read it.

Invariants:
- the batches are those `make` yields, in its order: one thread runs `make` from start to end, and nothing it
  draws depends on timing;
- a handed-over batch is finished: every tensor owns its contiguous storage (TriggerBatch.fresh), so the
  compiled step's own fresh() copies nothing;
- at most `depth` finished batches wait in the queue (a release-size batch holds about 200 MB of keys), beside
  the one the step uses and the one the producer is making;
- an error in the producer is raised in the consumer where its batch would have come; closing the consumer
  (break, exception, garbage collection) stops the producer, which closes `make` (and with it the part stager),
  and waits for the thread to end: no thread outlives its iterator.

On the CPU there are no streams or events, but the producer thread still runs: the code a GPU run uses is the code
the CPU tests run, and the batches are the same either way. The trainer's "device-inline" loader runs `make` on
the training thread instead (block_batches), for comparison.
"""

import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import closing, nullcontext
from dataclasses import dataclass

import torch
from torch.profiler import record_function

from .step import TriggerBatch

HANDOFF_DEPTH = 3  # finished batches waiting for the step
THREAD_NAME = "fm-batches"
WAIT_RANGE = "loader: wait for the producer"  # the consumer's time blocked on the queue, named in a profiler trace
_POLL_S = 0.05  # how often a producer waiting for room checks whether the consumer has stopped


@dataclass
class _Finished:
    batch: TriggerBatch
    ready: torch.cuda.Event | None  # recorded on the producer's stream after the batch's work (None on the CPU)


@dataclass
class _End:
    error: BaseException | None = None  # what stopped the producer, if it did not simply run out of batches


def produced_batches(
    make: Callable[[], Iterator[TriggerBatch]], device: torch.device, depth: int = HANDOFF_DEPTH
) -> Iterator[TriggerBatch]:
    """The batches of `make()`, made on a producer thread on `device` (see the module docstring). The thread
    starts at the first next(), so an iterator that is never advanced holds none."""
    if depth < 1:
        raise ValueError(f"the hand-over queue must hold at least 1 batch, got depth={depth}")
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    handoff: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    thread = threading.Thread(target=_produce, args=(make, stream, handoff, stop), name=THREAD_NAME, daemon=True)
    thread.start()
    try:
        while True:
            with record_function(WAIT_RANGE):
                item = handoff.get()
            if isinstance(item, _End):
                break
            yield _handed_over(item, stream)
        if item.error is not None:
            raise item.error
    finally:
        stop.set()
        if thread is not threading.current_thread():  # garbage collection may close the iterator on any thread
            thread.join()


def _produce(make, stream: torch.cuda.Stream | None, handoff: queue.Queue, stop: threading.Event) -> None:
    end = _End()
    try:
        with torch.cuda.stream(stream) if stream is not None else nullcontext(), closing(make()) as batches:
            for batch in batches:
                with record_function("loader: own batch"):
                    finished = _Finished(batch.fresh(), stream.record_event() if stream is not None else None)
                if not _put(handoff, stop, finished):
                    return
    except BaseException as error:  # handed to the consumer, which raises it
        end = _End(error)
    _put(handoff, stop, end)


def _put(handoff: queue.Queue, stop: threading.Event, item) -> bool:
    """Put `item` as soon as there is room; False, without putting it, once the consumer has stopped."""
    while not stop.is_set():
        try:
            handoff.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False


def _handed_over(item: _Finished, stream: torch.cuda.Stream | None) -> TriggerBatch:
    """The batch, safe to use on the consumer's current stream."""
    if item.ready is not None:
        current = torch.cuda.current_stream(stream.device)
        current.wait_event(item.ready)
        for tensor in item.batch.tensors():
            tensor.record_stream(current)
    return item.batch
