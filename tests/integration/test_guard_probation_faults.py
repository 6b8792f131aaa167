"""Guard faults against a real Prometheus: it down mid-probation, a worker's counter reset, a guard SIGKILLed, two guards.

The traffic is counted exactly as a worker and the feedback ingester count it (served,
consumed, latency, confidence, judged, correct, shadow-scored pairs against the replaced
version) into ``Metrics`` registries served over HTTP; a real ``prometheus`` scrapes them
every second and the guards read only PromQL. The guards of the SIGKILL and two-guard tests
are real ``loraloop guard`` processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from loraloop.metrics import Metrics, serve_http
from loraloop.model import load_base
from loraloop.registry import make_registry
from loraloop.settings import Settings
from loraloop.testing import build_constant_adapter, save_tiny_base_model
from services.guard import INSUFFICIENT, KEEP, ROLLBACK, build_guard
from services.guard_sources import PrometheusSource
from tests.infra import free_port

pytestmark = pytest.mark.integration

LABELS = ["yes", "no"]
RATE_PER_S = 60


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fault-adapters")
    settings = Settings(base_model=str(save_tiny_base_model(root / "base")), label_capacity=4)
    base = load_base(settings)
    return {name: build_constant_adapter(settings, LABELS, label, root / name, base=base, seed=i)
            for i, (name, label) in enumerate([("v1", "yes"), ("bad", "no"), ("good", "yes")])}


class _Worker:
    """One worker's /metrics endpoint; :meth:`restart` replaces its counters with fresh ones (a process restart)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.metrics = Metrics(CollectorRegistry())
        self.server = serve_http(self.metrics.registry, port, host="127.0.0.1")

    def restart(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.metrics = Metrics(CollectorRegistry())
        self.server = serve_http(self.metrics.registry, self.port, host="127.0.0.1")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Traffic(threading.Thread):
    """Requests whose answer is "yes" 90 % of the time, all judged, half of them shadow-scored by the replaced version."""

    def __init__(self, registry, workers: list[_Worker], favoured: dict[str, str], dead_share: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.registry, self.workers, self.favoured, self.dead_share = registry, workers, favoured, dead_share
        self.stop = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            pointer = self.registry.active()
            version = pointer.version
            probation = pointer.current_probation()
            m = self.workers[i % len(self.workers)].metrics
            truth = "no" if i % 10 == 0 else "yes"
            right = self.favoured[version] == truth
            m.requests_consumed.inc()
            if self.dead_share and i % round(1 / self.dead_share) == 0:
                m.dead_letters.labels(source="requests", reason="invalid_json").inc()
            m.requests_served.labels(adapter_version=version).inc()
            m.end_to_end_seconds.labels(adapter_version=version).observe(0.02)
            m.prediction_confidence.labels(adapter_version=version).observe(0.9)
            m.judged.labels(adapter_version=version).inc()
            m.correct.labels(adapter_version=version).inc(int(right))
            if probation is not None and probation.version == version and i % 2 == 0:
                old_right = self.favoured[probation.baseline] == truth
                outcome = {(True, True): "both_correct", (True, False): "new_only", (False, True): "old_only",
                           (False, False): "both_wrong"}[(right, old_right)]
                m.paired_judged.labels(adapter_version=version, outcome=outcome).inc()
            i += 1
            time.sleep(1 / RATE_PER_S)


def _wait(condition, timeout: float, what: str, poll: float = 0.2) -> None:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"{what} not seen within {timeout} s"
        time.sleep(poll)


def _setup(prometheus_server, tmp_path: Path, adapters: dict[str, Path], workers: int = 1, **overrides: object):
    values = dict(registry_url=str(tmp_path / "registry"), prometheus_url=prometheus_server.url,
                  guard_window_s=6.0, guard_min_judged=30, guard_max_watch_s=40.0, guard_poll_s=0.5,
                  guard_max_p99_ratio=20.0)
    values.update(overrides)
    settings = Settings(**values)
    registry = make_registry(settings)
    versions = {n: registry.publish(adapters[n]) for n in ("v1", "bad", "good")}
    registry.promote(versions["v1"], reason="initial")
    endpoints = [_Worker(free_port()) for _ in range(workers)]
    prometheus_server.start([f"127.0.0.1:{w.port}" for w in endpoints], scrape_interval_s=1)
    favoured = {versions["v1"]: "yes", versions["bad"]: "no", versions["good"]: "yes"}
    source = PrometheusSource(prometheus_server.url, 0.5)
    wanted = {f"127.0.0.1:{w.port}" for w in endpoints}
    _wait(lambda: wanted <= {r["metric"].get("instance") for r in source.query('up{job="loraloop"} == 1')}, 60,
          "Prometheus scraping every worker")
    return settings, registry, versions, endpoints, favoured


def _run_guard(guard):
    stop = threading.Event()
    thread = threading.Thread(target=guard.run, args=(stop,), daemon=True)
    thread.start()
    return stop, thread


def test_prometheus_down_mid_probation_decides_nothing_then_insufficient_evidence(
        prometheus_server, tmp_path: Path, adapters: dict[str, Path]) -> None:
    settings, registry, v, workers, favoured = _setup(prometheus_server, tmp_path, adapters, guard_min_judged=5000,
                                                      guard_max_watch_s=25.0)
    traffic = _Traffic(registry, workers, favoured)
    guard_metrics = Metrics(CollectorRegistry())
    guard = build_guard(settings, registry=registry, metrics=guard_metrics)
    stop, thread = _run_guard(guard)
    traffic.start()
    try:
        time.sleep(4)
        registry.promote(v["good"], reason="test")
        _wait(lambda: (registry.progress() or {}).get("pairs", 0) > 20, 20, "the guard's first pairs")
        prometheus_server.stop()
        _wait(lambda: (guard_metrics.registry.get_sample_value("loraloop_guard_source_errors_total") or 0) >= 3, 20,
              "source errors counted")
        assert registry.probation_open() and not guard.events  # no decision on missing data
        assert registry.progress()["state"] == "metrics_unavailable"
        _wait(lambda: guard.events, 40, "the decision at the probation limit")
    finally:
        stop.set()
        traffic.stop.set()
        thread.join(10)
        for w in workers:
            w.close()
    event = guard.events[0]
    assert (event.action, event.recorded) == (INSUFFICIENT, True)
    assert event.decided_at - event.promoted_at >= settings.guard_max_watch_s
    ended = registry.last_probation()
    assert ended.decision == INSUFFICIENT and ended.evidence["paired"]["pairs"] > 20  # what was gathered
    assert "metrics_unavailable" in ended.evidence
    assert registry.active().version == v["good"] and registry.last_kept() == v["v1"]


def test_a_worker_restart_mid_probation_is_no_false_regression(prometheus_server, tmp_path: Path,
                                                                adapters: dict[str, Path]) -> None:
    """Worker A had served 50 000 requests; it restarts during the probation and its counters start from 0."""
    settings, registry, v, workers, favoured = _setup(prometheus_server, tmp_path, adapters, workers=2,
                                                      guard_window_s=12.0, guard_min_judged=60)
    a = workers[0]
    a.metrics.requests_consumed.inc(50_000)
    a.metrics.dead_letters.labels(source="requests", reason="invalid_json").inc(100)
    traffic = _Traffic(registry, workers, favoured, dead_share=0.005)
    guard = build_guard(settings, registry=registry, metrics=Metrics(CollectorRegistry()))
    source = guard.source
    assert isinstance(source, PrometheusSource)
    _wait(lambda: source.counts(v["v1"]).consumed >= 50_000, 30, "worker A's long history in Prometheus")
    stop, thread = _run_guard(guard)
    traffic.start()
    try:
        time.sleep(5)
        registry.promote(v["good"], reason="test")
        since = registry.probation().started_at
        time.sleep(4)
        a.restart()
        _wait(lambda: guard.events, 60, "a decision on the good version")
        summed = source.counts(v["good"]).minus(source.counts(v["good"], since))
        resets = source.query("sum(resets(loraloop_requests_consumed_total[5m]))")
    finally:
        stop.set()
        traffic.stop.set()
        thread.join(10)
        for w in workers:
            w.close()
    event = guard.events[0]
    assert (event.action, event.reason) == (KEEP, "no_regression"), event.evidence["checks"]
    dead = event.evidence["checks"]["dead_letters"]
    assert dead["tested"] and dead["new_share"] < 0.02, dead
    assert float(resets[0]["value"][1]) >= 1, "Prometheus saw no counter reset: the fault did not happen"
    # what differencing the sums reads: the restarted worker's lost 50 000 hide the window's consumed requests
    assert summed.consumed < 0.5 * event.evidence["new"]["consumed"]
    print(f"consumed in the window: per series {event.evidence['new']['consumed']:.0f}, "
          f"difference of the sums {summed.consumed:.0f}")


def _guard_process(settings: Settings, tmp_path: Path, name: str) -> subprocess.Popen:
    env = {k: val for k, val in os.environ.items() if not k.startswith("LORALOOP_")}
    env.update(LORALOOP_REGISTRY_URL=settings.registry_url, LORALOOP_PROMETHEUS_URL=settings.prometheus_url,
               LORALOOP_GUARD_WINDOW_S=str(settings.guard_window_s),
               LORALOOP_GUARD_MIN_JUDGED=str(settings.guard_min_judged),
               LORALOOP_GUARD_MAX_WATCH_S=str(settings.guard_max_watch_s),
               LORALOOP_GUARD_POLL_S=str(settings.guard_poll_s),
               LORALOOP_GUARD_MAX_P99_RATIO=str(settings.guard_max_p99_ratio))
    log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, "-m", "loraloop.cli", "guard"], env=env, stdout=log,
                            stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_a_guard_sigkilled_mid_probation_is_replaced_by_one_that_resumes_from_the_metrics(
        prometheus_server, tmp_path: Path, adapters: dict[str, Path]) -> None:
    settings, registry, v, workers, favoured = _setup(prometheus_server, tmp_path, adapters, guard_window_s=12.0)
    traffic = _Traffic(registry, workers, favoured)
    traffic.start()
    first = _guard_process(settings, tmp_path, "first")
    second = None
    try:
        time.sleep(4)
        registry.promote(v["good"], reason="test")
        _wait(lambda: (registry.progress() or {}).get("by", "").endswith(f":{first.pid}")
              and registry.progress()["pairs"] > 10, 40, "the first guard judging")
        pairs_at_kill = registry.progress()["pairs"]
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        assert registry.probation_open() and registry.probation().version == v["good"]
        second = _guard_process(settings, tmp_path, "second")
        _wait(lambda: registry.last_probation() is not None, 60, "the second guard's decision")
    finally:
        traffic.stop.set()
        for proc in (first, second):
            if proc is not None:
                _stop(proc)
        for w in workers:
            w.close()
    ended = registry.last_probation()
    assert (ended.version, ended.decision) == (v["good"], KEEP), (tmp_path / "second.log").read_text()
    assert ended.decided_by.endswith(f":{second.pid}")
    assert ended.evidence["paired"]["pairs"] >= pairs_at_kill  # the evidence from before the kill was read back
    assert registry.last_kept() == v["good"]


def test_two_guards_at_once_roll_back_once(prometheus_server, tmp_path: Path, adapters: dict[str, Path]) -> None:
    settings, registry, v, workers, favoured = _setup(prometheus_server, tmp_path, adapters)
    traffic = _Traffic(registry, workers, favoured)
    traffic.start()
    guards = [_guard_process(settings, tmp_path, f"guard{i}") for i in range(2)]
    try:
        time.sleep(5)
        registry.promote(v["bad"], reason="test")
        _wait(lambda: registry.active().version == v["v1"], 40, "the rollback")
        time.sleep(3)  # both guards keep polling: neither may act again
    finally:
        traffic.stop.set()
        for proc in guards:
            _stop(proc)
        for w in workers:
            w.close()
    assert [p["decision"] for p in registry.probations()] == [ROLLBACK]
    assert [c["outcome"] for c in registry.cycles()] == ["rolled_back"]
    pointer = registry.active()
    assert pointer.version == v["v1"] and pointer.reason == "rollback: guard: correctness"
    assert registry.show(v["bad"]).status["status"] == "rejected"
