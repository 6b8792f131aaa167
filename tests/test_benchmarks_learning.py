"""Smoke tests of the learning-side benchmarks: each runs with ``--quick`` and writes sane JSON.

The figures of a quick run (a tiny random model, a few hundred requests) mean nothing; what
is checked is that every documented key is there and every value is in its range.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
LIVE = ("loraloop", "static", "naive", "head_only")
LEARNING = ("loraloop", "naive", "head_only")


def _run(script: str, out: Path, *extra: str, timeout: int = 150) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), "--quick", "--out", str(out), *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text())


def _is_accuracy(value: object) -> bool:
    return isinstance(value, float | int) and 0.0 <= value <= 1.0


@pytest.mark.slow
def test_drift_quick_reports_every_system(tmp_path: Path) -> None:
    data = _run("drift.py", tmp_path / "drift.json", "--poison", "--plot", str(tmp_path / "drift.png"))

    assert {*LIVE, "oracle", "oracle_same_feedback", "config", "machine", "poison"} <= set(data)
    for system in (*LIVE, "oracle"):
        figures = data[system]
        for key in ("final_accuracy", "final_accuracy_known", "final_accuracy_new"):
            assert _is_accuracy(figures[key]), (system, key, figures[key])
    for system in LIVE:
        figures = data[system]
        assert -1.0 <= figures["forgetting"] <= 1.0
        assert figures["prequential_accuracy"] and all(_is_accuracy(v) for v in figures["prequential_accuracy"])
        assert figures["requests"] == data["config"]["requests"]  # every request got its prediction
    for system in LEARNING:
        figures = data[system]
        for key in ("promotions", "rejections", "rollbacks"):
            assert isinstance(figures[key], int) and figures[key] >= 0, (system, key)
        assert figures["requests_to_80pct_new"] is None or figures["requests_to_80pct_new"] >= 0
        assert figures["learner_time_s"] > 0  # the learner ran at least one cycle
        decisions = figures["guard_decisions"]  # the guard's final word on each promotion it watched to the end
        assert all(d["action"] in ("keep", "rollback") and d["reason"] for d in decisions), decisions
        assert sum(d["action"] == "rollback" for d in decisions) >= figures["rollbacks"]
    assert "promotions" not in data["static"]  # the static baseline never learns
    same = data["oracle_same_feedback"]  # offline on exactly what loraloop's run received
    assert _is_accuracy(same["final_accuracy"]) and same["rows"] > 0
    loop = data["loraloop"]
    assert loop["efficiency"] == pytest.approx(loop["final_accuracy"] / same["final_accuracy"], abs=1e-3)
    assert 0 <= loop["set_aside_honest"] <= loop["honest_corrections"]
    assert loop["screened_honest"] + loop["quarantined_honest"] == loop["set_aside_honest"]
    assert all(v is None or v >= 0 for v in loop["requests_to_learn"].values()) and loop["requests_to_learn"]
    assert loop["per_seed"][0]["seed"] == data["config"]["seed"]
    assert data["oracle"]["final_accuracy"] > data["static"]["final_accuracy_new"]
    poison = data["poison"]
    assert _is_accuracy(poison["poisoned_final_accuracy"]) and _is_accuracy(poison["clean_final_accuracy"])
    assert poison["difference"] == pytest.approx(poison["poisoned_final_accuracy"] - poison["clean_final_accuracy"],
                                                 abs=1e-3)
    assert isinstance(poison["poisoned"]["poisoned_version_active_at_end"], bool)
    assert set(poison["poisoned"]["poisoned_versions_promoted"]) <= set(poison["poisoned"]["poisoned_versions"])
    by_version = poison["poisoned"]["poison_by_version"]  # wrong labels each version's claim held, screened, trained
    assert all(v["claimed"] == v["screened"] + v["trained"] > 0 for v in by_version.values()), by_version
    assert sum(v["claimed"] for v in by_version.values()) <= poison["poisoned"]["poisoned_events"]
    assert (tmp_path / "drift.png").stat().st_size > 10_000


def test_learner_cycle_quick_times_every_phase(tmp_path: Path) -> None:
    data = _run("learner_cycle.py", tmp_path / "cycle.json", "--devices", "cpu")

    assert [c["examples"] for c in data["cycles"]] == [100, 300]
    for cycle in data["cycles"]:
        for phase in ("claim", "build", "train", "evaluate", "publish"):
            assert cycle[phase] is not None and cycle[phase] >= 0, (phase, cycle)
        assert cycle["train"] > 0 and cycle["total_s"] > 0
        assert cycle["outcome"] in ("promoted", "rejected")
    modes = {r["mode"]: r for r in data["training"]}
    assert set(modes) == {"lora", "full"}
    assert all(r["examples_per_s"] > 0 for r in modes.values())
    assert modes["lora"]["trainable_params"] < modes["full"]["trainable_params"]
    assert modes["lora"]["speedup_vs_full"] > 0


@pytest.mark.integration
def test_feedback_ingest_quick_compares_with_redis_benchmark(tmp_path: Path) -> None:
    missing = [b for b in ("redis-server", "redis-benchmark") if shutil.which(b) is None]
    if missing:
        if os.environ.get("LORALOOP_REQUIRE_INFRA") == "1":
            pytest.fail(f"integration infrastructure required but unavailable: {missing}")
        pytest.skip(f"not installed: {missing}")
    data = _run("feedback_ingest.py", tmp_path / "ingest.json")

    ingester = data["ingester"]
    assert ingester["buffered"] == ingester["events"] == 1000
    assert ingester["events_per_s"] > 0
    assert {"evalsha", "xadd"} <= set(ingester["redis_calls_per_event"])  # one append script call per event
    rates = data["redis_benchmark"]["commands_per_s"]
    for name in ("get", "set", "xlen", "xadd"):
        assert rates["pipelined"][name] > 0 and rates["unpipelined"][name] > 0
    assert data["redis_benchmark"]["event_equivalent_per_s_pipelined"] > 0
    assert 0 < data["ratio_pipelined"] < 100
    assert data["config"]["redis"]["appendfsync"] == "everysec"


def test_drift_merge_combines_runs_split_by_seed_and_by_system() -> None:
    sys.path.insert(0, str(BENCHMARKS))
    from drift import merge_runs

    def run(seed: int, **systems: float) -> dict:
        return {name: {"final_accuracy": acc, "promotions": 3, "per_seed": [{"seed": seed, "final_accuracy": acc,
                                                                             "promotions": 3}]}
                for name, acc in systems.items()} | {"config": {"seed": seed}, "machine": {}}

    merged = merge_runs([run(0, loraloop=0.80, head_only=0.78), run(1, loraloop=0.90), run(1, head_only=0.76)])
    assert merged["loraloop"]["final_accuracy"] == pytest.approx(0.85)
    assert merged["loraloop"]["sd"]["final_accuracy"] == pytest.approx(0.0707, abs=1e-4)
    assert [r["seed"] for r in merged["head_only"]["per_seed"]] == [0, 1]
    assert merged["head_only"]["final_accuracy"] == pytest.approx(0.77)
    assert merged["config"]["seeds"] == [0, 1] and merged["config"]["merged_from"] == 3
