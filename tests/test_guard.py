"""The rollback guard: its decision table, its statistics, its sources and its loop on a real registry."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from loraloop.metrics import METRIC_NAMES, Metrics
from loraloop.model import load_base
from loraloop.registry import make_registry
from loraloop.settings import Settings
from loraloop.testing import build_constant_adapter, save_tiny_base_model
from services.guard import (
    INSUFFICIENT,
    KEEP,
    ROLLBACK,
    WAIT,
    build_guard,
    decide,
    promotion_of,
    worse_p_value,
)
from services.guard_sources import (
    GUARD_METRICS,
    Counts,
    InProcessSource,
    PrometheusSource,
    VersionStats,
    bucket_quantile,
    share_below,
    to_stats,
)
from tests.infra import free_port, http_status

T = Settings(guard_window_s=60, guard_min_judged=50, guard_max_watch_s=600, guard_alpha=0.01, guard_max_p99_ratio=1.5,
             guard_max_low_confidence_increase=0.2, guard_max_dead_letter_increase=0.05)
OLD = VersionStats("old", judged=1000, correct=900, consumed=2000, dead_letters=10, p99_latency_s=0.1,
                   low_confidence_share=0.1, served=2000)


def _new(**kw: float) -> VersionStats:
    base = dict(judged=200, correct=180, consumed=400, dead_letters=2, p99_latency_s=0.1,
                low_confidence_share=0.1, served=400)
    base.update(kw)
    return VersionStats("new", **base)


# --- the decision table -------------------------------------------------------------------------
@pytest.mark.parametrize(("new", "elapsed", "action", "reason"), [
    # 5 unlucky events: all wrong, but far below guard_min_judged -> never a rollback
    (_new(judged=5, correct=0, served=5, consumed=5), 10, WAIT, "need_judged"),
    (_new(judged=5, correct=0, served=5, consumed=5), 90, WAIT, "need_judged"),
    # quiet traffic: keep watching past the window until guard_min_judged arrive, up to the limit...
    (_new(judged=5, correct=0, served=5, consumed=5), 180, WAIT, "need_judged"),
    # ... and then insufficient evidence, not a keep and not a rollback
    (_new(judged=5, correct=0, served=5, consumed=5), 600, INSUFFICIENT, "insufficient_evidence"),
    (VersionStats("new"), 600, INSUFFICIENT, "insufficient_evidence"),  # no judged traffic at all
    # without shadow pairs, the window test is a fixed-sample test: looked at once, at the decision
    (_new(judged=60, correct=20), 5, WAIT, "window_open"),
    (_new(judged=60, correct=20), 61, ROLLBACK, "correctness"),
    # as good as before: wait for the window, then keep
    (_new(judged=200, correct=182), 30, WAIT, "window_open"),
    (_new(judged=200, correct=182), 60, KEEP, "no_regression"),
    # a small, not significant dip is kept
    (_new(judged=60, correct=50), 61, KEEP, "no_regression"),
    # latency, low confidence and dead letters: judged once, at the decision
    (_new(p99_latency_s=0.2), 5, WAIT, "window_open"),
    (_new(p99_latency_s=0.2), 60, ROLLBACK, "p99_latency"),
    (_new(p99_latency_s=5.0, served=150, consumed=150), 60, KEEP, "no_regression"),  # too few for a p99
    (_new(p99_latency_s=0.14), 61, KEEP, "no_regression"),
    (_new(low_confidence_share=0.45), 61, ROLLBACK, "low_confidence"),
    (_new(low_confidence_share=0.25), 61, KEEP, "no_regression"),  # +15 points: under the 20 allowed
    (_new(dead_letters=60), 61, ROLLBACK, "dead_letters"),  # 15 % vs 0.5 %
    (_new(dead_letters=60, judged=5, correct=5), 600, ROLLBACK, "dead_letters"),  # at the limit too
    (_new(dead_letters=12), 61, KEEP, "no_regression"),  # 3 %: under the 5 points allowed
])
def test_decision_table(new: VersionStats, elapsed: float, action: str, reason: str) -> None:
    decision = decide(new, OLD, T, elapsed)
    assert (decision.action, decision.reason) == (action, reason), decision.evidence["checks"]
    json.dumps(decision.evidence)  # evidence is stored in the registry as JSON


def test_small_samples_never_trigger_the_share_and_latency_checks() -> None:
    tiny = VersionStats("new", judged=3, correct=0, consumed=4, dead_letters=3, p99_latency_s=5.0,
                        low_confidence_share=1.0, served=4)
    decision = decide(tiny, OLD, T, 10)
    assert decision.action == WAIT
    assert not any(c["tested"] for c in decision.evidence["checks"].values())


def test_tiny_latencies_are_compared_at_the_histogram_floor() -> None:
    old = VersionStats("old", judged=1000, correct=900, p99_latency_s=0.001, served=2000)
    assert decide(_new(p99_latency_s=0.004), old, T, 61).action == KEEP  # 4x, but both under 10 ms
    assert decide(_new(p99_latency_s=0.05), old, T, 61).reason == "p99_latency"


def test_low_confidence_is_reported_not_judged_for_a_version_that_adds_labels() -> None:
    spread = _new(low_confidence_share=0.45)
    assert decide(spread, OLD, T, 61).reason == "low_confidence"
    decision = decide(spread, OLD, T, 61, adds_labels=True)
    assert (decision.action, decision.reason) == (KEEP, "no_regression")
    assert decision.evidence["checks"]["low_confidence"]["would_regress"] is True
    worse = _new(judged=200, correct=100, low_confidence_share=0.45)
    assert decide(worse, OLD, T, 61, adds_labels=True).reason == "correctness"  # the other checks still judge


def test_the_guard_reads_from_the_registry_whether_a_promotion_adds_labels(adapters: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    settings = Settings(registry_url=str(tmp_path / "registry"))
    registry = make_registry(settings)
    guard = build_guard(settings, registry=registry, metrics=Metrics(CollectorRegistry()))
    two, three, again = (registry.publish(adapters[name], metadata={"labels": n})
                         for name, n in (("v1", 2), ("good", 3), ("bad", 3)))
    for version, adds in ((two, None), (three, True), (again, False)):
        registry.promote(version, reason="test")
        guard.observe(registry.active())
        assert (guard.watch.adds_labels if guard.watch else None) is adds


def test_without_a_baseline_only_the_window_decides() -> None:
    decision = decide(_new(judged=200, correct=10), VersionStats("old"), T, 61)
    assert (decision.action, decision.reason) == (KEEP, "no_baseline")


# --- statistics -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("a", "n1", "c", "n2"), [(0, 5, 900, 1000), (40, 60, 900, 1000), (85, 100, 90, 100),
                                                   (7, 10, 3, 10), (50, 50, 10, 20), (0, 0, 5, 10)])
def test_fisher_exact_matches_scipy(a: int, n1: int, c: int, n2: int) -> None:
    stats = pytest.importorskip("scipy.stats")
    expected = 1.0 if n1 == 0 else stats.fisher_exact([[a, n1 - a], [c, n2 - c]], alternative="less").pvalue
    assert worse_p_value(a, n1, c, n2) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_large_samples_use_the_z_test() -> None:
    p = worse_p_value(14_000, 20_000, 9_100, 13_000)  # 70 % vs 70 %: nothing
    assert 0.3 < p < 0.7
    p = worse_p_value(13_000, 20_000, 9_100, 13_000)  # 65 % vs 70 %
    z = (0.65 - 0.7) / math.sqrt((22_100 / 33_000) * (1 - 22_100 / 33_000) * (1 / 20_000 + 1 / 13_000))
    assert p == pytest.approx(0.5 * math.erfc(-z / math.sqrt(2)), rel=1e-9)
    assert p < 1e-10


def test_bucket_quantile_and_share_follow_histogram_quantile() -> None:
    buckets = {0.1: 50.0, 0.2: 100.0, math.inf: 100.0}
    assert bucket_quantile(0.5, buckets) == pytest.approx(0.1)
    assert bucket_quantile(0.99, buckets) == pytest.approx(0.1 + 0.1 * 49 / 50)
    assert bucket_quantile(0.99, {0.1: 10.0, math.inf: 100.0}) == 0.1  # rank in +Inf: the last finite bound
    assert bucket_quantile(0.99, {0.1: 0.0, math.inf: 0.0}) is None
    assert share_below(0.1, buckets) == pytest.approx(0.5)
    assert share_below(0.15, buckets) == pytest.approx(0.75)
    assert share_below(0.05, buckets) == pytest.approx(0.25)
    assert share_below(0.5, {}) is None


# --- sources --------------------------------------------------------------------------------------
def _serve(metrics: Metrics, version: str, n: int, correct: int, latency_s: float = 0.02,
           score: float = 0.9, dead: int = 0) -> None:
    """What a worker and the feedback ingester count for ``n`` served and judged requests."""
    metrics.requests_consumed.inc(n + dead)
    metrics.requests_served.labels(adapter_version=version).inc(n)
    for _ in range(n):
        metrics.end_to_end_seconds.labels(adapter_version=version).observe(latency_s)
        metrics.prediction_confidence.labels(adapter_version=version).observe(score)
    metrics.judged.labels(adapter_version=version).inc(n)
    metrics.correct.labels(adapter_version=version).inc(correct)
    if dead:
        metrics.dead_letters.labels(source="requests", reason="invalid_json").inc(dead)
    metrics.dead_letters.labels(source="feedback", reason="unknown_request").inc(5)  # not a serving problem


def test_in_process_source_counts_since_the_promotion() -> None:
    metrics = Metrics(CollectorRegistry())
    source = InProcessSource(metrics.registry, low_confidence=0.5)
    _serve(metrics, "v1", 300, 270, latency_s=0.02, dead=3)
    t0 = time.time()
    source.begin("v2", "v1", t0)
    _serve(metrics, "v1", 10, 10)  # late traffic of the old version: not in the new window
    _serve(metrics, "v2", 100, 40, latency_s=0.3, score=0.3, dead=20)
    new = source.stats("v2", t0)
    assert (new.judged, new.correct, new.served, new.consumed, new.dead_letters) == (100, 40, 100, 130, 20)
    assert 0.25 < new.p99_latency_s <= 0.5
    assert new.low_confidence_share == pytest.approx(1.0)
    old = source.baseline("v1", t0)
    assert (old.judged, old.correct, old.served, old.consumed, old.dead_letters) == (300, 270, 300, 303, 3)
    assert 0.01 < old.p99_latency_s <= 0.025
    assert old.low_confidence_share == 0.0


def test_guard_reads_only_defined_metrics() -> None:
    exposed = {m if m in METRIC_NAMES else m + "_total" for m in GUARD_METRICS}
    assert exposed <= METRIC_NAMES
    for promql in PrometheusSource("http://x", 0.5).queries('v"1').values():
        assert 'v\\"1' in promql or "adapter_version" not in promql


def test_counts_difference_is_clamped() -> None:
    later = Counts(judged=5, latency={0.1: 3.0})
    earlier = Counts(judged=8, latency={0.1: 1.0, 0.2: 4.0})
    window = later.minus(earlier)
    assert window.judged == 0 and window.latency == {0.1: 2.0}
    assert to_stats("v", window, 0.5).p99_latency_s == pytest.approx(0.099, rel=1e-6)


# --- the loop on a real file registry ------------------------------------------------------------
LABELS = ["yes", "no"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three real PEFT adapters on a tiny base: two predict "yes" (good), one predicts "no" (bad)."""
    root = tmp_path_factory.mktemp("guard-adapters")
    settings = Settings(base_model=str(save_tiny_base_model(root / "base")), label_capacity=4)
    base = load_base(settings)
    return {name: build_constant_adapter(settings, LABELS, label, root / name, base=base, seed=i)
            for i, (name, label) in enumerate([("v1", "yes"), ("bad", "no"), ("good", "yes")])}


class _Traffic(threading.Thread):
    """Users asking questions whose answer is "yes" 90 % of the time; counted as worker + ingester do."""

    def __init__(self, registry, metrics: Metrics, favoured: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.registry, self.metrics, self.favoured = registry, metrics, favoured
        self.stop = threading.Event()
        self.served: dict[str, int] = {}

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            version = self.registry.active().version
            truth = "no" if i % 10 == 0 else "yes"
            _serve(self.metrics, version, 1, int(self.favoured[version] == truth))
            self.served[version] = self.served.get(version, 0) + 1
            i += 1
            time.sleep(0.002)


def test_guard_rolls_back_a_bad_adapter_and_keeps_a_good_one(adapters: dict[str, Path], tmp_path: Path) -> None:
    settings = Settings(registry_url=str(tmp_path / "registry"), guard_window_s=1.0, guard_min_judged=40,
                        guard_poll_s=0.05, adapter_poll_s=0.05, guard_max_p99_ratio=5.0)
    registry = make_registry(settings)
    versions = {name: registry.publish(folder) for name, folder in adapters.items()}
    favoured = {versions["v1"]: "yes", versions["bad"]: "no", versions["good"]: "yes"}
    metrics = Metrics(CollectorRegistry())
    guard = build_guard(settings, registry=registry, metrics=metrics)
    assert isinstance(guard.source, InProcessSource)
    registry.promote(versions["v1"], reason="initial")
    traffic = _Traffic(registry, metrics, favoured)
    stop = threading.Event()
    runner = threading.Thread(target=guard.run, args=(stop,), daemon=True)
    traffic.start()
    runner.start()
    try:
        time.sleep(0.5)  # the baseline: v1 serves alone
        promoted_at = time.time()
        registry.promote(versions["bad"], reason="test")
        deadline = time.monotonic() + 20
        while registry.active().version == versions["bad"]:
            assert time.monotonic() < deadline, f"bad adapter not rolled back; guard events {guard.events}"
            time.sleep(0.02)
        detected = time.time() - promoted_at
        while not guard.events:  # the rollback comes first, the annotations right after
            assert time.monotonic() < deadline, "rollback not annotated"
            time.sleep(0.02)
        pointer = registry.active()
        assert pointer.version == versions["v1"] and pointer.reason == "rollback: guard: correctness"
        while "status" not in registry.show(versions["bad"]).status:  # written right after the event
            assert time.monotonic() < deadline, "rejection not recorded"
            time.sleep(0.02)
        status = registry.show(versions["bad"]).status
        assert status["status"] == "rejected" and status["evidence"]["reason"] == "correctness"
        assert status["evidence"]["new"]["judged"] >= 40
        assert metrics.registry.get_sample_value("loraloop_rollbacks_total", {"reason": "correctness"}) == 1
        assert detected < settings.guard_window_s + 2  # a clear drop does not wait for the window
        assert [c["outcome"] for c in registry.cycles()] == ["rolled_back"]

        registry.promote(versions["good"], reason="test")
        deadline = time.monotonic() + 20
        while not any(e.version == versions["good"] for e in guard.events):
            assert time.monotonic() < deadline, "no decision on the good adapter"
            time.sleep(0.05)
        assert registry.active().version == versions["good"]
        assert guard.events[-1].action == KEEP and guard.events[-1].reason == "no_regression"
        assert registry.show(versions["good"]).status == {}
        assert metrics.registry.get_sample_value("loraloop_guard_decisions_total",
                                                 {"action": "keep", "reason": "no_regression"}) == 1
    finally:
        stop.set()
        traffic.stop.set()
        runner.join(timeout=5)
        traffic.join(timeout=5)
    assert not runner.is_alive()


def test_a_manual_promote_during_probation_wins_and_is_recorded(adapters: dict[str, Path], tmp_path: Path) -> None:
    """The regression is established, but an operator promoted by hand first: the guard's rollback is refused."""
    settings = Settings(registry_url=str(tmp_path / "registry"), guard_window_s=1.0, guard_min_judged=40)
    registry = make_registry(settings)
    v1, bad, good = (registry.publish(adapters[n]) for n in ("v1", "bad", "good"))
    metrics = Metrics(CollectorRegistry())
    now = [1000.0]
    guard = build_guard(settings, registry=registry, metrics=metrics, clock=lambda: now[0])
    registry.promote(v1)
    guard.observe(registry.active())
    assert guard.watch is None and registry.last_kept() == v1  # the first version: nothing to compare with
    _serve(metrics, v1, 500, 450)
    registry.promote(bad)
    guard.observe(registry.active())
    assert guard.watch is not None and guard.watch.version == bad and registry.probation_open()
    _serve(metrics, bad, 100, 10)
    registry.promote(good, reason="operator", probation=False)  # what `loraloop adapters promote` does
    active = registry.active()
    now[0] = guard.watch.since_ts + 5
    decision = guard.check()
    assert decision.action == ROLLBACK  # the guard had its evidence...
    assert registry.active() == active and guard.events[-1].recorded is False  # ...but the operator won
    assert guard.events[-1].rolled_back is False and registry.show(bad).status == {}
    assert metrics.registry.get_sample_value("loraloop_guard_conflicts_total") == 1
    assert metrics.registry.get_sample_value("loraloop_rollbacks_total", {"reason": "correctness"}) is None
    ended = registry.last_probation()
    assert (ended.version, ended.decision, ended.decided_by) == (bad, "manual", "operator")
    assert registry.last_kept() == good and not registry.probation_open()
    assert [p["decision"] for p in registry.probations()] == ["manual"]


def test_promotion_of_reads_the_probation() -> None:
    from loraloop.registry import ActivePointer, Probation

    probation = Probation("v2", "v1", "v1", 0.0, 1.0, 10.0, 5, 2).to_dict()
    assert promotion_of(ActivePointer("v2", 2, ("v1",), "test", probation=probation)) == ("v2", "v1")
    assert promotion_of(ActivePointer("v2", 2, ("v1",), "test")) is None  # not on probation: nothing to judge
    assert promotion_of(ActivePointer("v1", 1, (), "initial")) is None


# --- the command --------------------------------------------------------------------------------


def test_guard_command_needs_prometheus(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from loraloop.cli import main

    assert main(["guard", "--registry-url", str(tmp_path / "registry")]) == 1
    assert "--prometheus-url" in capsys.readouterr().err


def test_guard_command_serves_health_and_stops_on_sigterm(tmp_path: Path) -> None:
    """Live while Prometheus is unreachable, but not ready; SIGTERM ends it with 0."""
    port, dead = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORALOOP_")}
    proc = subprocess.Popen([sys.executable, "-m", "loraloop.cli", "guard", "--metrics-port", str(port),
                             "--prometheus-url", f"http://127.0.0.1:{dead}", "--registry-url",
                             str(tmp_path / "registry")], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while http_status(f"http://127.0.0.1:{port}/healthz") != 200:
            assert proc.poll() is None, proc.communicate()[0].decode()
            assert time.monotonic() < deadline, "guard did not serve /healthz within 60 s"
            time.sleep(0.2)
        assert http_status(f"http://127.0.0.1:{port}/readyz") == 503
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            assert b'loraloop_build_info{role="guard"' in r.read()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- shadow-scored pairs ------------------------------------------------------------------------
def test_paired_mcnemar_p_value() -> None:
    from services.guard import paired_worse_p_value

    assert paired_worse_p_value(0, 0) == 1.0
    assert paired_worse_p_value(new_only=5, old_only=5) == pytest.approx(0.623, abs=1e-3)  # P(Bin(10,.5) >= 5)
    assert paired_worse_p_value(new_only=0, old_only=10) == pytest.approx(0.5 ** 10)
    assert paired_worse_p_value(new_only=10, old_only=0) == pytest.approx(1.0)


@pytest.mark.parametrize(("new", "action", "reason"), [
    # traffic drifted at the promotion (new intents): the window test alone would roll back
    # (60 % vs 90 %), but on the same requests the new version is as good as the old one
    (_new(judged=200, correct=120, paired_judged=60, paired_new_only=3, paired_old_only=3), KEEP, "no_regression"),
    # on the same requests the replaced adapter was right far more often: a real regression
    (_new(judged=200, correct=120, paired_judged=60, paired_new_only=1, paired_old_only=20), ROLLBACK, "correctness"),
    # with shadow scoring on, too few pairs means wait, whatever the plain judged count says
    (_new(judged=200, correct=20, paired_judged=10, paired_new_only=0, paired_old_only=10), WAIT, "need_judged"),
])
def test_pairs_decide_correctness_when_the_worker_shadow_scores(new: VersionStats, action: str, reason: str) -> None:
    decision = decide(new, OLD, T, 61)
    assert (decision.action, decision.reason) == (action, reason), decision.evidence["checks"]["correctness"]


def test_in_process_source_reads_the_paired_outcomes() -> None:
    metrics = Metrics(CollectorRegistry())
    for outcome, n in (("both_correct", 7), ("new_only", 2), ("old_only", 5), ("both_wrong", 1)):
        metrics.paired_judged.labels(adapter_version="v2", outcome=outcome).inc(n)
    stats = InProcessSource(metrics.registry, low_confidence=0.5).stats("v2", since_ts=0.0)
    assert (stats.paired_judged, stats.paired_new_only, stats.paired_old_only) == (15, 2, 5)
