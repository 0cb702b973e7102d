"""The indexer training throughput benchmark runs end to end at tiny sizes on the CPU and reports what it says."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fm_transformers.training.producer import WAIT_RANGE

SCRIPT = Path(__file__).parents[2] / "examples" / "benchmarks" / "indexer_training_throughput.py"


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("benchmark") / "small.json"
    # CPU runs whatever the machine: on a GPU the script would pick the GPU's runs
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, str(SCRIPT), "--small", "--profile-loader", "16", "--output", str(output)]
    finished = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    return json.loads(output.read_text()), finished.stdout


def test_the_benchmark_compares_the_host_and_device_loaders_in_one_run(small_run):
    results, _ = small_run
    assert list(results["runs"]) == ["host", "device"]
    for run in results["runs"].values():
        assert run["samples_per_s"] > 0 and run["timed_steps"] == results["windows"]["timed"]
        assert 0 < run["loader_alone_share"] <= 1
        assert sorted(run["loader_s_per_sample"]) == ["1024", "2048", "4096"]
        assert run["paper"]["trigger_steps"] == results["paper"]["trigger_steps"]
        assert run["paper"]["hours_at_measured_rate"] > 0


def test_the_exposed_loader_share_compares_the_run_with_one_fed_premade_batches(small_run):
    results, _ = small_run
    assert results["ring_batches"] == 8
    for run in results["runs"].values():
        premade = run["premade"]
        assert premade["ring_batches"] == 8 and premade["step_ms"] > 0
        assert run["loader_exposed_share"] == pytest.approx(1 - premade["step_ms"] / run["step_ms"])


def test_the_loader_profile_gives_each_loaders_top_ops_and_host_time(small_run):
    results, stdout = small_run
    profiles = results["loader_profile"]
    assert list(profiles) == ["host", "device"]
    for loader, found in profiles.items():
        assert found["batches"] == 16 and found["host_ms_per_batch"] > 0 and found["wall_ms_per_batch"] > 0
        assert 0 < len(found["top_self_cpu"]) <= 15 and found["top_cuda"] == []  # no CUDA on the CPU
        assert found["self_cpu_ms_per_batch"]["main_thread"] > 0
        assert f"{loader} loader over 16 batches" in stdout
    device = profiles["device"]
    ranges = {row["name"] for row in device["ranges"]}
    assert {"loader: gather batch", "loader: own batch", "loader: stage part", WAIT_RANGE} <= ranges
    assert WAIT_RANGE not in {row["name"] for row in device["top_self_cpu"]}  # waiting is not work
    assert device["self_cpu_ms_per_batch"]["other_threads"] > 0  # part staging, on the stager's thread


def test_the_benchmark_reports_the_floor_from_counted_flops(small_run):
    results, _ = small_run
    assert results["flops_per_step"] > 0 and results["peak_tflops_assumed"] == 989.0
    floor = results["floor"]
    assert floor["step_ms"] == pytest.approx(results["flops_per_step"] / 989e12 * 1e3)
    assert 22_000_000 < results["paper"]["trigger_steps"] < 24_000_000


def test_both_loaders_record_loss_curves_that_start_alike(small_run):
    results, _ = small_run
    host, device = (results["runs"][name]["loss_curve"] for name in ("host", "device"))
    assert len(host) == len(device) > 0
    assert device[0][1] == pytest.approx(host[0][1], rel=0.1)


def test_the_table_comes_last(small_run):
    _, stdout = small_run
    lines = stdout.strip().splitlines()
    assert "samples/s" in lines[-3] and lines[-2].split()[0] == "host" and lines[-1].split()[0] == "device"
