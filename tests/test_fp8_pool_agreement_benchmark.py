"""The FP8 pool agreement benchmark runs end to end at tiny sizes (--quick) and reports what it promises."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "benchmarks" / "fp8_pool_agreement.py"


def test_quick_run_compares_a_bf16_and_an_fp8_pool_with_stock(tmp_path):
    out = tmp_path / "agreement.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)], capture_output=True, text=True, timeout=600, check=True
    )
    (run,) = json.loads(out.read_text())["runs"]
    bf16, fp8 = run["pools"]["bfloat16"], run["pools"]["float8_e4m3fn"]
    for row in (bf16, fp8):
        assert 0 <= row["top1_agreement"] <= 1 and row["chunks_fetched"] > 0
    assert fp8["mean_abs_logit_error"] > bf16["mean_abs_logit_error"]  # the bf16 pool is an exact copy
    assert 0.5 < fp8["host_stored_bytes"] / bf16["host_stored_bytes"] < 0.56
    assert 0.5 < fp8["recall_bytes"] / bf16["recall_bytes"] < 0.56
    assert "2K | float8_e4m3fn |" in done.stdout
