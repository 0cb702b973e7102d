"""The memory report of an OffloadedLookaheadCache, measured from the tensors that exist.

"device" is where the model computes (the GPU; the CPU in CPU-only runs), "host" is the cold pool.
Bytes are read off the tensors (`nbytes` of the hot-set table rows holding chunks, of the rows kept free
for the tail, of the stock cache tensors; allocated storage of the pool slabs), never from a formula.
`full_csa_bytes` is what the stock cache would hold for the CSA compressed KV and indexer keys: the entries
stored in the pool, at the model's dtype.
"""

import torch

from .layout import CSA_LAYER_TYPE


def _device_bytes(tensors) -> int:
    return sum(tensor.nbytes for tensor in tensors if isinstance(tensor, torch.Tensor))


def stock_layer_bytes(layer) -> int:
    """Bytes held by a stock cache layer's tensors: window keys/values and compressor state (for an LSA CSA
    layer, whose compressed entries live in its pool and hot set, the window and compression state)."""
    tensors = [layer.keys, layer.values if layer.values is not layer.keys else None]
    for states in ("compressed_kv", "buffer_kv", "buffer_gate", "overlap_kv", "overlap_gate"):
        tensors.extend(getattr(layer, states, {}).values())
    return _device_bytes(tensors)


def stock_csa_bytes(cache, layer_types, kinds=("compressor", "indexer")) -> int:
    """Bytes of the CSA compressed entries a stock DeepSeek-V4 cache holds (compressed KV and indexer keys),
    read off its tensors: the baseline every LSA byte count is compared with."""
    return sum(
        layer.compressed_kv[kind].nbytes
        for layer, layer_type in zip(cache.layers, layer_types)
        if layer_type == CSA_LAYER_TYPE
        for kind in kinds
        if layer.compressed_kv[kind] is not None
    )


def memory_report(cache) -> dict:
    """Bytes by place and kind summed over the layers (each CSA layer reports its own, `layer.memory()`), the
    full-cache equivalent (what the cold pools store: they equal the stock cache), the ratio, recall counters.

    device: resident KV (chunks recalled), tail KV (made since the last recall, or the whole history during a
    prefill), index keys (in full for target and refresh layers, else resident + tail), room kept free for the
    tail, window and compression state, the other layers' stock cache, and the fixed buffers of CUDA-graph
    decode (decode_graph.py: windows, compressor state, HCA entries; their last values are written back into
    the stock layers when the graph stops, which is why both are counted). host: bytes stored in the cold
    pools and bytes the pool slabs have allocated (stored + room for the next entries); an FP8 pool's bytes
    include its scales. Recall counters, summed over CSA layers: chunks fetched, the host bytes they took
    (pool entries as stored), and the contiguous host ranges they came from (HotSet.fetched_ranges).
    """
    parts = [layer.memory() for layer in cache.lookahead_layers()]
    parts = [part for part in parts if part]
    total = lambda key: sum(part[key] for part in parts)  # noqa: E731
    other = sum(stock_layer_bytes(layer) for index, layer in enumerate(cache.layers) if index not in cache.csa_layers)
    csa_device = total("resident_kv") + total("tail_kv") + total("index_keys")
    full = total("full_bytes")
    lookahead = cache.lookahead_layers()
    graph = getattr(cache, "decode_graph", None)
    return {
        "device": {
            "csa_resident_kv": total("resident_kv"),
            "csa_tail_kv": total("tail_kv"),
            "csa_index_keys": total("index_keys"),
            "csa_tail_room": total("tail_room"),
            "csa_window_and_state": total("window_and_state"),
            "other_layers": other,
            "decode_graph_state": graph.state_bytes() if graph is not None else 0,
        },
        "host": {
            "csa_kv_stored": total("host_kv_stored"),
            "csa_index_keys_stored": total("host_index_keys_stored"),
            "allocated": total("host_allocated"),
        },
        "csa_device_bytes": csa_device,
        "index_keys_in_full_layers": sum(part["index_keys_in_full"] for part in parts),
        "full_csa_bytes": full,
        "csa_device_ratio": csa_device / full if full else 0.0,
        "resident_chunks": total("resident_chunks"),
        "chunks_in_history": total("chunks"),
        "recalls": max((layer.recalls for layer in lookahead), default=0),
        "refreshes": max((layer.refreshes for layer in lookahead), default=0),
        "chunks_fetched": sum(layer.chunks_fetched for layer in lookahead),
        "bytes_fetched": sum(layer.bytes_fetched for layer in lookahead),
        "ranges_fetched": total("ranges_fetched"),
    }


def format_memory_report(report: dict) -> str:
    """A short human-readable table of a memory report, columns aligned."""
    mib = lambda value: f"{value / 2**20:10.3f} MiB"  # noqa: E731
    lines = ["LSA memory report"]
    for place in ("device", "host"):
        for kind, value in report[place].items():
            lines.append(f"  {place:6s} {kind:24s} {mib(value)}")
    lines.append(f"  {'stock cache, CSA entries':31s} {mib(report['full_csa_bytes'])}")
    lines.append(f"  {'CSA on device / stock':31s} {report['csa_device_ratio']:10.3f}")
    if report["index_keys_in_full_layers"]:
        lines.append(
            f"  (the native index keys of {report['index_keys_in_full_layers']} target/refresh layer(s) stay on the "
            "device in full: level 1 scores them)"
        )
    lines.append(f"  resident chunks (all CSA layers, all sequences): {report['resident_chunks']} of {report['chunks_in_history']}")
    lines.append(
        f"  recalls per layer: {report['recalls']} (+{report['refreshes']} refreshes on a miss), "
        f"chunks fetched from the pool: {report['chunks_fetched']} "
        f"({report['bytes_fetched'] / 2**20:.3f} MiB in {report['ranges_fetched']} contiguous host ranges)"
    )
    return "\n".join(lines)
