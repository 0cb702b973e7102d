"""The memory report of an OffloadedLookaheadCache, measured from the tensors that exist.

"device" is where the model computes (the GPU; the CPU in CPU-only runs), "host" is the cold pool.
Bytes are read off the tensors (`nbytes` of the hot-set table rows holding chunks, of the rows kept free
for the tail, of the stock cache tensors; allocated storage of the pool slabs), never from a formula.
`full_csa_bytes` is what the stock cache would hold for the CSA compressed KV and indexer keys: the entries
stored in the pool, at the model's dtype.
"""

import torch


def _device_bytes(tensors) -> int:
    return sum(tensor.nbytes for tensor in tensors if isinstance(tensor, torch.Tensor))


def _stock_layer_bytes(layer) -> int:
    """Bytes held by a stock sliding-window or HCA layer: window keys/values and compressor state."""
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
        if layer_type == "compressed_sparse_attention"
        for kind in kinds
        if layer.compressed_kv[kind] is not None
    )


def memory_report(cache) -> dict:
    """Bytes by place and kind, the full-cache equivalent, the ratio, and recall counters."""
    lookahead = cache.lookahead_layers()
    csa_kv = csa_index = tail_room = host_kv = host_index = full = 0
    resident = 0
    for layer in lookahead:
        if layer.hot is None:
            continue
        csa_kv += layer.hot.device_bytes("compressor")
        csa_index += layer.hot.device_bytes("indexer") if "indexer" in layer.hot.kinds else layer.index_keys.nbytes
        tail_room += layer.hot.spare_bytes()
        host_kv += layer.pools["compressor"].allocated_bytes()
        host_index += layer.pools["indexer"].allocated_bytes()
        model_itemsize = layer.hot.dtype.itemsize
        for pool in layer.pools.values():
            full += pool.batch_size * pool.length * pool.dim * model_itemsize
        resident += layer.hot.resident_count()
    csa_state = sum(
        _device_bytes([*layer.buffer_kv.values(), *layer.buffer_gate.values(), *layer.overlap_kv.values(), *layer.overlap_gate.values()])
        + _device_bytes([layer.keys, layer.values if layer.values is not layer.keys else None])
        for layer in lookahead
    )
    other = sum(_stock_layer_bytes(layer) for index, layer in enumerate(cache.layers) if index not in cache.csa_layers)
    csa_device = csa_kv + csa_index
    return {
        "device": {
            "csa_kv": csa_kv,
            "csa_index_keys": csa_index,
            "csa_tail_room": tail_room,
            "csa_window_and_state": csa_state,
            "other_layers": other,
        },
        "host": {"csa_kv": host_kv, "csa_index_keys": host_index},
        "full_csa_bytes": full,
        "csa_device_ratio": csa_device / full if full else 0.0,
        "resident_chunks": resident,
        "chunks_in_history": sum(layer.num_chunks * layer.pools["compressor"].batch_size for layer in lookahead if layer.hot is not None),
        "recalls": max((layer.recalls for layer in lookahead), default=0),
        "refreshes": max((layer.refreshes for layer in lookahead), default=0),
        "chunks_fetched": sum(layer.chunks_fetched for layer in lookahead),
    }


def format_memory_report(report: dict) -> str:
    """A short human-readable table of a memory report."""
    mib = lambda value: f"{value / 2**20:9.3f} MiB"  # noqa: E731
    lines = ["LSA memory report"]
    for place in ("device", "host"):
        for kind, value in report[place].items():
            lines.append(f"  {place:6s} {kind:22s} {mib(value)}")
    lines.append(f"  full-cache CSA bytes (stock)  {mib(report['full_csa_bytes'])}")
    lines.append(f"  CSA bytes on device / full     {report['csa_device_ratio']:.3f}")
    lines.append(f"  resident chunks (all CSA layers, all sequences): {report['resident_chunks']} of {report['chunks_in_history']}")
    lines.append(
        f"  recalls per layer: {report['recalls']} (+{report['refreshes']} refreshes on a miss), "
        f"chunks fetched from the pool: {report['chunks_fetched']}"
    )
    return "\n".join(lines)
