"""The long-context decode benchmark runs end to end at tiny sizes (--quick) and reports what it promises."""

import json
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "benchmarks" / "decode_long_context.py"


def test_quick_run_measures_stock_and_lsa_at_each_batch_size_and_kernels_against_floors(tmp_path):
    out = tmp_path / "decode.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--refresh", "--page-recall", "--fp8-pool", "--batch-sizes", "1,2", "--out", str(out)],
        capture_output=True, text=True, timeout=600, check=True,
    )
    results = json.loads(out.read_text())
    assert [(run["context"], run["batch"]) for run in results["runs"]] == [(4096, 1), (4096, 2)]
    for run in results["runs"]:
        assert run["stock"]["ms_per_token"] > 0 and run["lsa"]["ms_per_token"] > 0
        assert run["lsa"]["csa_kv_gpu_bytes"] < run["stock"]["csa_kv_gpu_bytes"]
        assert run["lsa_refresh"]["ms_per_token"] > 0 and run["lsa_refresh"]["refreshes"] > 0
        lsa, fp8 = run["lsa"], run["lsa_fp8"]
        assert fp8["recall_chunks"] == lsa["recall_chunks"] > 0 and fp8["recall_ranges"] == lsa["recall_ranges"] > 0
        assert fp8["recall_bytes"] / lsa["recall_bytes"] == (64 + 4) / (2 * 64)  # quick head_dim 64: codes + scale
        assert 0.5 < fp8["host_stored_bytes"] / lsa["host_stored_bytes"] < 0.55
        assert run["lsa_pages"]["ms_per_token"] > 0 and run["lsa_pages"]["host_stored_bytes"] == lsa["host_stored_bytes"]
    assert [k["batch"] for k in results["kernels"]] == [1, 2, 4]  # batch 4 is always measured
    for kernel in results["kernels"]:
        assert 0 < kernel["level2_floor_ms"] and 0 < kernel["attention_floor_ms"] < kernel["stock_layer_step_floor_ms"]
    table = done.stdout[done.stdout.index("GPU:") :].splitlines()
    assert len(table) <= 26 and table[3].startswith("4K | 1 |")  # 16 lines, 10 more for the variant table
    assert "LSA with every CSA layer a refresh layer" in done.stdout
    assert "pages, bf16 pool" in done.stdout and "chunks, FP8 pool" in done.stdout


def test_a_run_out_of_gpu_memory_is_reported_as_oom(load_example):
    script = load_example("benchmarks/decode_long_context.py")

    def too_big():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    assert script.measure(too_big) == script.OOM
    assert script.measure(lambda: {"ms_per_token": 1.0}) == {"ms_per_token": 1.0}
