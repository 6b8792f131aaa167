"""The serving benchmarks run (``--quick``: tiny random base) and report what they document."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240  # each takes well under a minute on an idle 2-core machine


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict, str]]:
    """Both benchmarks, run side by side (one torch thread each): name -> (JSON, stdout)."""
    out_dir = tmp_path_factory.mktemp("bench")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORALOOP_")}
    procs = {}
    for name in ("hot_swap", "worker_throughput"):
        cmd = [sys.executable, str(REPO_ROOT / "benchmarks" / f"{name}.py"), "--quick", "--threads", "1",
               "--out", str(out_dir / f"{name}.json")]
        procs[name] = subprocess.Popen(cmd, cwd=out_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True)
    outputs = {}
    for name, proc in procs.items():
        try:
            stdout, _ = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for other in procs.values():
                other.kill()
            pytest.fail(f"benchmarks/{name}.py --quick took over {TIMEOUT_S} s")
        assert proc.returncode == 0, f"benchmarks/{name}.py failed:\n{stdout}"
        outputs[name] = (json.loads((out_dir / f"{name}.json").read_text()), stdout)
    return outputs


def test_hot_swap_quick(results: dict[str, tuple[dict, str]]) -> None:
    data, stdout = results["hot_swap"]
    for key in ("swaps", "requests", "failed", "lost", "p50_ms", "p99_ms", "p99_during_swap_ms", "swap_s_p50",
                "swap_s_max", "duplicates", "stale", "goal_met", "settings", "machine"):
        assert key in data, key
    assert data["swaps"] == 10 and data["swaps_not_applied"] == 0
    assert data["failed"] == 0 and data["lost"] == 0 and data["dead_letters"] == 0 and data["stale"] == 0
    assert data["requests"] >= 500 and data["predictions"] == data["requests"]  # ~100/s for ~25 s
    assert data["steady_requests"] > 0 and data["during_swap_requests"] > 0
    assert 0 < data["p50_ms"] <= data["p99_ms"]
    assert data["p99_during_swap_ms"] > 0
    assert 0 <= data["swap_s_p50"] <= data["swap_s_max"] < 2.0  # a swap reaches the worker within 2 s
    assert data["settings"]["quick"] is True and data["goal_met"] is False  # 10 swaps < the 50 of the goal
    assert "p99_during_swap_ms" in stdout and "goal" in stdout


def test_worker_throughput_quick(results: dict[str, tuple[dict, str]]) -> None:
    data, stdout = results["worker_throughput"]
    for key in ("ratio_to_bare_b32", "ratio_to_naive", "sorted_upper_bound_ratio", "worker_to_sorted_b32",
                "flops_per_request", "matmul_gflop_per_s", "runs", "goal_met", "machine", "settings"):
        assert key in data, key
    runs = {r["run"]: r for r in data["runs"]}
    expected = {f"{kind} b{b}" for kind in ("bare", "worker") for b in (1, 8, 32, 64)}
    expected |= {"bare sorted b8", "bare sorted b32", "bare sorted b64", "naive"}
    assert set(runs) == expected
    n = data["settings"]["texts"]
    for name, run in runs.items():
        assert run["requests"] == n and run["requests_per_s"] > 0, name
        assert 0 < run["p50_ms"] <= run["p99_ms"], name
        assert 0 < run["fraction_of_peak"] < 1, name
        if name.startswith("worker"):
            assert run["predictions"] == n and run["dead_letters"] == 0, name
            assert run["ratio_to_bare_same_batch"] > 0, name
    assert runs["worker b1"]["batches"] >= n  # max_batch 1: one request per batch (+ the warm-up)
    assert runs["worker b32"]["batches"] < runs["worker b8"]["batches"]
    for key in ("ratio_to_bare_b32", "ratio_to_naive", "sorted_upper_bound_ratio", "worker_to_sorted_b32"):
        assert data[key] > 0, key
    assert data["ratio_to_bare_b32"] == pytest.approx(
        runs["worker b32"]["requests_per_s"] / runs["bare b32"]["requests_per_s"], rel=0.01)
    assert data["flops_per_request"] > 0 and data["matmul_gflop_per_s"] > 0
    assert 0.3 < data["flops_per_request"] / data["flops_per_request_estimated"] < 3  # counted vs 2*params*tokens
    assert "ratio_to_bare_b32" in stdout


def test_rollback_quick(tmp_path: Path) -> None:
    """A bad adapter promoted under load is rolled back by the guard; nothing fails or is lost."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORALOOP_")}
    out = tmp_path / "rollback.json"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "rollback.py"), "--quick", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    for key in ("detected_after_s", "rolled_back_after_s", "requests", "failed", "lost", "bad_predictions_served"):
        assert key in data, key
    assert data["failed"] == 0 and data["lost"] == 0 and data["requests"] > 100
    assert 0 < data["detected_after_s"] <= data["rolled_back_after_s"]
    assert data["bad_predictions_served"] > 0
