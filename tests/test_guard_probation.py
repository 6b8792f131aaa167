"""Probation: the sequential test's error rate and power, the registry's probation state, and the guard's faults."""

from __future__ import annotations

import logging
import math
import threading
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from loraloop.metrics import Metrics
from loraloop.model import load_base
from loraloop.registry import ActivePointer, Probation, make_registry
from loraloop.settings import Settings
from loraloop.stats import discordant_log_lr, paired_sequential_p_value, paired_worse_p_value
from loraloop.testing import build_constant_adapter, save_tiny_base_model
from services.guard import INSUFFICIENT, KEEP, ROLLBACK, WAIT, Terms, build_guard, decide
from services.guard_sources import InProcessSource, MetricSource, Reading, SourceError, VersionStats
from tests.test_guard import OLD, T, _serve

ALPHA = 0.05  # a large alpha makes the error-rate check sharp with a few thousand sequences


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real PEFT adapters on a tiny base (what the registry checks); the traffic is counted, not served."""
    root = tmp_path_factory.mktemp("probation-adapters")
    settings = Settings(base_model=str(save_tiny_base_model(root / "base")), label_capacity=4)
    base = load_base(settings)
    return {name: build_constant_adapter(settings, ["yes", "no"], label, root / name, base=base, seed=i)
            for i, (name, label) in enumerate([("v1", "yes"), ("bad", "no"), ("good", "yes")])}


def _log_lr_table(n: int) -> np.ndarray:
    """log LR for every (old_only, new_only) with old_only + new_only <= n."""
    table = np.full((n + 1, n + 1), -np.inf)
    for b in range(n + 1):
        for c in range(n + 1 - b):
            table[b, c] = discordant_log_lr(b, c)
    return table


def _ever_rejects(rate_old_only: float, sequences: int, length: int, table: np.ndarray, seed: int) -> np.ndarray:
    """Per sequence: whether the test rejects at any of ``length`` looks (one after every discordant pair)."""
    rng = np.random.default_rng(seed)
    old_only = np.cumsum(rng.random((sequences, length)) < rate_old_only, axis=1)
    new_only = np.arange(1, length + 1)[None, :] - old_only
    return (table[old_only, new_only] >= math.log(1 / ALPHA)).any(axis=1)


def test_the_sequential_test_holds_its_error_rate_under_continuous_monitoring() -> None:
    """A/A: 4000 sequences of 400 discordant pairs, looked at after every pair: rejections <= alpha."""
    length, sequences = 400, 4000
    table = _log_lr_table(length)
    rejected = _ever_rejects(0.5, sequences, length, table, seed=1)
    # binomial tolerance: 3 standard deviations above alpha
    limit = ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / sequences)
    assert rejected.mean() <= limit, rejected.mean()
    # the fixed-sample McNemar test looked at as often rejects far more often than alpha: the reason for the change
    rng = np.random.default_rng(1)
    naive = 0
    for _ in range(400):
        outcomes = rng.random(length) < 0.5
        b = np.cumsum(outcomes)
        naive += any(paired_worse_p_value(k + 1 - b[k], b[k]) < ALPHA for k in range(0, length, 5))
    assert naive / 400 > 2 * ALPHA, naive / 400


def test_the_sequential_test_detects_a_clear_regression_quickly() -> None:
    """Power: when the replaced adapter wins 75 % of the discordant pairs, 200 pairs nearly always suffice."""
    table = _log_lr_table(200)
    assert _ever_rejects(0.75, 2000, 200, table, seed=2).mean() >= 0.95
    assert _ever_rejects(0.25, 2000, 200, table, seed=3).mean() <= ALPHA  # better, not worse: no rejection


def test_sequential_p_value_is_monotone_in_the_evidence() -> None:
    assert paired_sequential_p_value(0, 0) == 1.0
    assert paired_sequential_p_value(new_only=10, old_only=10) == 1.0
    ps = [paired_sequential_p_value(new_only=2, old_only=b) for b in range(5, 30)]
    assert all(a >= b for a, b in zip(ps, ps[1:], strict=False))
    assert paired_sequential_p_value(new_only=0, old_only=9) < 0.01 < paired_sequential_p_value(0, 8)


# --- the decision on probation -------------------------------------------------------------------
def _paired(pairs: float, new_only: float, old_only: float, **kw: float) -> VersionStats:
    base = dict(judged=pairs, correct=pairs * 0.9, consumed=pairs * 2, dead_letters=0, p99_latency_s=0.1,
                low_confidence_share=0.1, served=pairs * 2, paired_judged=pairs, paired_new_only=new_only,
                paired_old_only=old_only)
    base.update(kw)
    return VersionStats("new", **base)


@pytest.mark.parametrize(("new", "elapsed", "action", "reason"), [
    (_paired(20, 0, 12), 2, ROLLBACK, "correctness"),  # sequential: before the window and before min judged
    (_paired(20, 0, 6), 2, WAIT, "need_judged"),  # 6 one-sided pairs are not enough
    (_paired(200, 0, 0), 61, KEEP, "no_regression"),  # identical predictions: kept at the window
    (_paired(200, 10, 16), 61, WAIT, "within_margin_not_shown"),  # 3 points down: not rejected, not kept
    (_paired(200, 10, 16), 600, INSUFFICIENT, "insufficient_evidence"),
    (_paired(200, 10, 12), 61, KEEP, "no_regression"),  # 1 point down: within the 2-point margin
])
def test_paired_decisions_on_probation(new: VersionStats, elapsed: float, action: str, reason: str) -> None:
    decision = decide(new, OLD, T, elapsed)
    assert (decision.action, decision.reason) == (action, reason), decision.evidence["checks"]["correctness"]
    assert decision.evidence["paired"] == {"pairs": new.paired_judged, "new_only": new.paired_new_only,
                                           "old_only": new.paired_old_only}


def test_carried_evidence_of_unkept_versions_adds_up() -> None:
    """Each step alone is not enough to reject; with the unkept predecessors' pairs carried, the chain is."""
    step = _paired(200, 1, 8)
    assert decide(step, OLD, T, 100).action == WAIT
    carried = {"pairs": 400, "new_only": 2, "old_only": 16, "versions": ["v1", "v2"]}
    decision = decide(step, OLD, T, 100, terms=Terms(60, 600, 50, carried))
    assert (decision.action, decision.reason) == (ROLLBACK, "correctness")
    assert decision.evidence["checks"]["correctness"]["carried_from"] == ["v1", "v2"]


# --- counter resets --------------------------------------------------------------------------------
def test_a_counter_reset_is_differenced_per_series_not_mistaken_for_a_regression() -> None:
    """Worker A restarts mid-probation: summing first would read 30 dead letters against 500 consumed (6 %)."""
    a, b = (("instance", "a"),), (("instance", "b"),)
    at_start = Reading({"consumed": {a: 10_000.0, b: 20_000.0}, "dead_letters": {a: 0.0, b: 60.0}})
    now = Reading({"consumed": {a: 500.0, b: 30_000.0}, "dead_letters": {a: 1.0, b: 89.0}})  # a restarted
    window = now.since(at_start)
    assert (window.consumed, window.dead_letters) == (10_500.0, 30.0)  # 0.29 %: what really happened
    summed = now.total().minus(at_start.total())
    assert summed.dead_letters / summed.consumed > 0.05  # the false regression a sum-first difference shows
    born = Reading({"judged": {a: 7.0}}).since(Reading())
    assert born.judged == 7.0  # a series born since counts whole


# --- the guard loop: faults with an injected source and clock ------------------------------------------
class _Flaky(MetricSource):
    """An in-process source that can be switched off (Prometheus unreachable)."""

    def __init__(self, inner: InProcessSource) -> None:
        super().__init__(inner.low_confidence, inner.lookback_s)
        self.inner, self.down = inner, False

    def begin(self, version, previous, since_ts) -> None:
        self.inner.begin(version, previous, since_ts)

    def reading(self, version: str, at: float | None = None) -> Reading:
        if self.down:
            raise SourceError("prometheus at http://127.0.0.1:1 unreachable (test)")
        return self.inner.reading(version, at)


def _pairs(metrics: Metrics, version: str, both: int, new_only: int = 0, old_only: int = 0) -> None:
    for outcome, n in (("both_correct", both), ("new_only", new_only), ("old_only", old_only)):
        if n:
            metrics.paired_judged.labels(adapter_version=version, outcome=outcome).inc(n)


def _guard(tmp_path: Path, adapters: dict[str, Path], **settings: object):
    s = Settings(registry_url=str(tmp_path / "registry"), guard_window_s=10.0, guard_min_judged=40,
                 guard_max_watch_s=60.0, guard_poll_s=1.0, **settings)
    registry = make_registry(s)
    versions = [registry.publish(adapters[n]) for n in ("v1", "good", "bad")]
    metrics = Metrics(CollectorRegistry())
    now = [1_000.0]
    source = _Flaky(InProcessSource(metrics.registry, s.guard_low_confidence))
    guard = build_guard(s, registry=registry, metrics=metrics, source=source, clock=lambda: now[0])
    registry.promote(versions[0], reason="initial")
    _serve(metrics, versions[0], 300, 270)
    return s, registry, metrics, source, guard, now, versions


def test_prometheus_unreachable_decides_nothing_until_the_limit_then_insufficient_evidence(
        adapters: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    s, registry, metrics, source, guard, now, (v1, good, _) = _guard(tmp_path, adapters)
    registry.promote(good, reason="test")
    guard.observe(registry.active())
    since = guard.watch.since_ts
    now[0] = since + 2
    _serve(metrics, good, 20, 18)
    _pairs(metrics, good, 10, 1, 1)
    assert guard.check().action == WAIT
    source.down = True
    with caplog.at_level(logging.WARNING, logger="services.guard"):
        for t in (5, 20, 59):
            now[0] = since + t
            assert guard.check() is None  # no decision on missing data
    assert any("cannot read its metrics" in r.getMessage() for r in caplog.records)
    assert metrics.registry.get_sample_value("loraloop_guard_source_errors_total") == 3
    assert registry.probation_open(now=since + 59) and registry.progress()["state"] == "metrics_unavailable"
    now[0] = since + 61
    decision = guard.check()
    assert (decision.action, decision.reason) == (INSUFFICIENT, INSUFFICIENT)
    ended = registry.last_probation()
    assert ended.decision == INSUFFICIENT and ended.evidence["paired"]["pairs"] == 12  # the evidence gathered
    assert "unreachable" in ended.evidence["metrics_unavailable"]
    assert registry.active().version == good and registry.last_kept() == v1  # not kept, not rolled back


def test_no_judged_traffic_ends_in_insufficient_evidence_not_a_rollback(adapters: dict[str, Path],
                                                                        tmp_path: Path) -> None:
    s, registry, metrics, source, guard, now, (v1, good, _) = _guard(tmp_path, adapters)
    registry.promote(good, reason="test")
    guard.observe(registry.active())
    since = guard.watch.since_ts
    for t in (5, 30, 59):
        now[0] = since + t
        assert guard.check().action == WAIT
    now[0] = since + 60
    assert guard.check().action == INSUFFICIENT
    assert registry.active().version == good
    assert metrics.registry.get_sample_value("loraloop_guard_decisions_total",
                                             {"action": INSUFFICIENT, "reason": INSUFFICIENT}) == 1
    assert metrics.registry.get_sample_value("loraloop_rollbacks_total", {"reason": "correctness"}) is None


def test_rollback_goes_to_the_last_kept_version_not_the_previous(adapters: dict[str, Path], tmp_path: Path) -> None:
    s, registry, metrics, source, guard, now, (v1, good, bad) = _guard(tmp_path, adapters)
    registry.promote(good, reason="learner")
    guard.observe(registry.active())
    now[0] = guard.watch.since_ts + 61
    assert guard.check().action == INSUFFICIENT  # good was never judged: not kept
    registry.promote(bad, reason="learner")
    probation = registry.probation()
    assert (probation.baseline, probation.last_kept) == (good, v1)
    guard.observe(registry.active())
    now[0] = guard.watch.since_ts + 2
    _pairs(metrics, bad, 2, 0, 12)
    decision = guard.check()
    assert decision.action == ROLLBACK
    pointer = registry.active()
    assert pointer.version == v1 and pointer.reason == "rollback: guard: correctness"
    assert guard.events[-1].rolled_back_to == v1 and registry.show(bad).status["status"] == "rejected"


def test_two_guards_never_both_roll_back(adapters: dict[str, Path], tmp_path: Path) -> None:
    """Both see the same regression and decide at once: the pointer's compare-and-set records one."""
    s, registry, metrics, source, guard, now, (v1, good, bad) = _guard(tmp_path, adapters)
    other = build_guard(s, registry=make_registry(s), metrics=metrics, source=source, clock=lambda: now[0],
                        name="guard-2")
    registry.promote(bad, reason="learner")
    for g in (guard, other):
        g.observe(registry.active())
    now[0] = guard.watch.since_ts + 3
    _pairs(metrics, bad, 5, 0, 15)
    barrier = threading.Barrier(2)
    results = []

    def judge(g) -> None:
        barrier.wait()
        results.append(g.check())

    threads = [threading.Thread(target=judge, args=(g,)) for g in (guard, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [d.action for d in results] == [ROLLBACK, ROLLBACK]
    events = guard.events + other.events
    assert sorted(e.recorded for e in events) == [False, True]
    assert metrics.registry.get_sample_value("loraloop_rollbacks_total", {"reason": "correctness"}) == 1
    assert metrics.registry.get_sample_value("loraloop_guard_conflicts_total") == 1
    assert [p["decision"] for p in registry.probations()] == [ROLLBACK]
    assert [c["outcome"] for c in registry.cycles()] == ["rolled_back"]
    assert registry.active().version == v1


# --- the registry's probation state ---------------------------------------------------------------------
def test_registry_probation_lifecycle(adapters: dict[str, Path], tmp_path: Path) -> None:
    settings = Settings(registry_url=str(tmp_path / "registry"), guard_window_s=5, guard_min_judged=30,
                        guard_max_watch_s=50)
    registry = make_registry(settings)
    v1, v2, v3 = (registry.publish(adapters[n]) for n in ("v1", "good", "bad"))
    assert registry.promote(v1).probation is None and registry.last_kept() == v1
    pointer = registry.promote(v2, reason="learner")
    probation = registry.probation()
    assert (probation.version, probation.baseline, probation.last_kept, probation.needed, probation.limit_s) == \
        (v2, v1, v1, 30, 50)
    assert probation.generation == pointer.generation and registry.probation_open()
    # the learner holds a newer candidate meanwhile, and promotes it when the probation ends
    registry.hold(v3)
    assert registry.pending() == v3 and registry.promote_pending("learner") is None
    assert registry.end_probation(v2, KEEP, {"paired": {"pairs": 40}}, generation=probation.generation - 1) is None
    kept = registry.end_probation(v2, KEEP, {"paired": {"pairs": 40}}, generation=probation.generation,
                                  reason="no_regression", by="g1")
    assert kept is not None and kept.last_kept == v2 and kept.version == v2 and kept.generation > pointer.generation
    assert registry.end_probation(v2, ROLLBACK, {}, generation=probation.generation) is None  # already decided
    promoted = registry.promote_pending("learner: held candidate")
    assert promoted.version == v3 and promoted.pending is None and registry.probation().baseline == v2
    # a promotion after the limit without a guard decision records insufficient evidence
    late = registry.probation()
    assert not late.is_open(now=late.started_at + 51)
    again = ActivePointer.from_json(registry.active().to_json())
    assert again == registry.active()  # the probation state survives JSON


def test_probation_off_makes_promotions_final(adapters: dict[str, Path], tmp_path: Path) -> None:
    registry = make_registry(Settings(registry_url=str(tmp_path / "registry"), guard_probation=False))
    v1, v2 = (registry.publish(adapters[n]) for n in ("v1", "good"))
    registry.promote(v1)
    assert registry.promote(v2).probation is None and registry.last_kept() == v2
    with pytest.raises(Exception, match="no probation terms"):
        registry.promote(v1, probation=True)


def test_a_damaged_probation_in_the_pointer_is_refused_with_its_reason() -> None:
    with pytest.raises(ValueError, match="probation needed"):
        ActivePointer.from_json('{"version": "v2", "probation": {"version": "v2", "baseline": "v1", '
                                '"started_at": 1, "window_s": 1, "limit_s": 2, "needed": -1, "generation": 1}}')
    with pytest.raises(ValueError, match="last_kept"):
        ActivePointer.from_json('{"version": "v2", "last_kept": 7}')
    assert Probation.from_dict(Probation("a", "b", None, 0.0, 1.0, 2.0, 3, 4).to_dict()).needed == 3
