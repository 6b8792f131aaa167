"""The rollback guard: after every promotion, compare the new adapter with the one it replaced.

Two pieces:

* :func:`decide` is pure: the new version's :class:`VersionStats` since its promotion, the
  replaced version's baseline, the thresholds and the time elapsed give a
  :class:`Decision` -- ``wait``, ``keep`` or ``rollback`` -- with its reason and evidence.
* :class:`RollbackGuard` does the I/O: it follows the registry's active pointer, and while a
  promotion is under watch reads the metric source every ``guard_poll_s``; on ``rollback``
  it rolls the registry back (only if the watched version is still active), marks the
  version rejected with the evidence, records a ``rolled_back`` cycle and counts the
  rollback in ``loraloop_rollbacks_total``.

Regressions (any one rolls back, as soon as it is established):

* **correctness** -- live correctness (``correct / judged``) lower than the old version's,
  by a one-sided test at ``guard_alpha`` (Fisher's exact test; a two-proportion z-test
  above :data:`loraloop.stats.EXACT_TEST_MAX_N` judged), and only once ``guard_min_judged`` predictions of
  the new version were judged: 5 unlucky events never roll back;
* **p99 latency** -- end-to-end p99 over the whole window more than ``guard_max_p99_ratio``
  times the old one's (both taken as at least :data:`P99_FLOOR_S`, below the histogram's
  resolution); checked once the window is over, with :data:`P99_MIN_SERVED` predictions a side;
* **low confidence** -- the share of predictions scoring at or below
  ``guard_low_confidence`` up by more than ``guard_max_low_confidence_increase`` (reported but
  not a regression for a version that adds labels: its probability is spread over more of
  them, and the traffic that brought the new labels is new to the old version's baseline);
* **dead letters** -- the share of consumed requests dead-lettered up by more than
  ``guard_max_dead_letter_increase``.

The share rises must also be significant at ``guard_alpha`` (so a handful of dead letters
in a quiet minute is not a regression), and every check needs ``guard_min_judged``
observations on both sides. Without a regression the new version is kept once
``guard_window_s`` has passed with ``guard_min_judged`` judged; with fewer (quiet traffic, or
traffic held back), the guard keeps watching until they arrive, up to ``guard_max_watch_s``,
and then keeps it with reason ``insufficient_evidence``.

The guard peeks at the evidence every poll, which makes its real false-alarm rate higher
than ``guard_alpha`` (repeated testing); the default alpha of 0.01 leaves room for that.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Protocol

from loraloop.metrics import Metrics
from loraloop.redact import mask_url
from loraloop.registry import ActivePointer, AdapterRegistry, RegistryError, make_registry
from loraloop.settings import Settings
from loraloop.stats import paired_worse_p_value, worse_p_value
from services.guard_sources import (
    DEFAULT_LOOKBACK_S,
    InProcessSource,
    MetricSource,
    PrometheusSource,
    SourceError,
    VersionStats,
)

logger = logging.getLogger(__name__)

WAIT, KEEP, ROLLBACK = "wait", "keep", "rollback"
BASELINE_WINDOWS = 3  # the replaced version's baseline spans at least this many windows
P99_FLOOR_S = 0.01  # p99 latencies are compared as at least this (histogram resolution)
P99_MIN_SERVED = 200  # predictions on each side before a p99 is compared (the top 1 % is then 2+ of them)
LOG_EVERY_S = 30.0


class GuardThresholds(Protocol):
    """The settings :func:`decide` reads (a :class:`Settings` is one)."""

    guard_window_s: float
    guard_min_judged: int
    guard_watch_limit_s: float
    guard_alpha: float
    guard_max_p99_ratio: float
    guard_max_low_confidence_increase: float
    guard_max_dead_letter_increase: float


@dataclass(frozen=True)
class Decision:
    """What the guard concluded about one promotion at one moment."""

    action: str  # wait | keep | rollback
    reason: str
    evidence: dict = field(default_factory=dict)


# --- the decision -------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Check:
    name: str
    regressed: bool
    evidence: dict


def _enough_judged(new: VersionStats, t: GuardThresholds) -> bool:
    """Shadow-scored pairs decide when there are any; plain judged counts only without shadow scoring."""
    if new.paired_judged > 0:
        return new.paired_judged >= t.guard_min_judged
    return new.judged >= t.guard_min_judged


def _check_correctness(new: VersionStats, old: VersionStats, t: GuardThresholds, elapsed_s: float) -> _Check:
    """Paired when the worker shadow-scored the replaced adapter, else new window vs old window.

    The paired test compares both adapters on the *same* requests, so traffic that drifts
    at the moment of a promotion (new intents, a different hour) cannot pass for a regression;
    the window test compares different traffic and is the fallback when shadow scoring is off.
    """
    if new.paired_judged > 0:
        evidence = {"paired": True, "pairs": new.paired_judged, "new_only": new.paired_new_only,
                    "old_only": new.paired_old_only}
        if new.paired_judged < t.guard_min_judged:
            return _Check("correctness", False, {**evidence, "tested": False})
        p = paired_worse_p_value(new.paired_new_only, new.paired_old_only)
        return _Check("correctness", p < t.guard_alpha, {**evidence, "tested": True, "p_value": p})
    evidence: dict = {"paired": False, "new_accuracy": new.accuracy, "old_accuracy": old.accuracy,
                      "new_judged": new.judged, "old_judged": old.judged}
    if new.judged < t.guard_min_judged or old.judged <= 0:
        return _Check("correctness", False, {**evidence, "tested": False})
    p = worse_p_value(new.correct, new.judged, old.correct, old.judged)
    return _Check("correctness", p < t.guard_alpha, {**evidence, "tested": True, "p_value": p})


def _check_share_rise(name: str, new_bad: float, new_n: float, old_bad: float, old_n: float,
                      max_increase: float, t: GuardThresholds) -> _Check:
    if new_n < t.guard_min_judged or old_n < t.guard_min_judged:
        return _Check(name, False, {"tested": False, "new_n": new_n, "old_n": old_n})
    new_share, old_share = new_bad / new_n, old_bad / old_n
    p = worse_p_value(new_n - new_bad, new_n, old_n - old_bad, old_n)
    rise = new_share - old_share
    return _Check(name, rise > max_increase and p < t.guard_alpha,
                  {"tested": True, "new_share": new_share, "old_share": old_share, "rise": rise,
                   "max_increase": max_increase, "p_value": p, "new_n": new_n, "old_n": old_n})


def _check_low_confidence(new: VersionStats, old: VersionStats, t: GuardThresholds, elapsed_s: float) -> _Check:
    if new.low_confidence_share is None or old.low_confidence_share is None:
        return _Check("low_confidence", False, {"tested": False, "new_n": new.served, "old_n": old.served})
    return _check_share_rise("low_confidence", new.low_confidence_share * new.served, new.served,
                             old.low_confidence_share * old.served, old.served,
                             t.guard_max_low_confidence_increase, t)


def _check_dead_letters(new: VersionStats, old: VersionStats, t: GuardThresholds, elapsed_s: float) -> _Check:
    return _check_share_rise("dead_letters", new.dead_letters, new.consumed, old.dead_letters, old.consumed,
                             t.guard_max_dead_letter_increase, t)


def _check_latency(new: VersionStats, old: VersionStats, t: GuardThresholds, elapsed_s: float) -> _Check:
    """p99 ratio, once the window is over and both sides have enough predictions for a p99.

    A p99 of a few dozen predictions is their maximum, and the first seconds after a
    promotion hold the swap's pause: judged on the whole window, neither can trigger alone.
    """
    evidence: dict = {"new_p99_s": new.p99_latency_s, "old_p99_s": old.p99_latency_s,
                      "max_ratio": t.guard_max_p99_ratio}
    needed = max(t.guard_min_judged, P99_MIN_SERVED)
    if (new.p99_latency_s is None or old.p99_latency_s is None or new.served < needed or old.served < needed
            or elapsed_s < t.guard_window_s):
        return _Check("p99_latency", False, {**evidence, "tested": False})
    ratio = max(new.p99_latency_s, P99_FLOOR_S) / max(old.p99_latency_s, P99_FLOOR_S)
    return _Check("p99_latency", ratio > t.guard_max_p99_ratio, {**evidence, "tested": True, "ratio": ratio})


CHECKS: tuple[Callable[[VersionStats, VersionStats, GuardThresholds, float], _Check], ...] = (
    _check_correctness, _check_latency, _check_low_confidence, _check_dead_letters)


def _informational(check: _Check, why: str) -> _Check:
    return _Check(check.name, False, {**check.evidence, "ignored": why, "would_regress": check.regressed})


def decide(new: VersionStats, old: VersionStats, thresholds: GuardThresholds, elapsed_s: float,
           adds_labels: bool = False) -> Decision:
    """Wait, keep or roll back a promoted version, from its stats and its predecessor's.

    Args:
        new: the promoted version since its promotion.
        old: the version it replaced (its baseline window).
        thresholds: the ``guard_*`` settings.
        elapsed_s: seconds since the promotion.
        adds_labels: the new version knows labels the old one did not (low confidence is then
            reported, not judged).

    Returns:
        ``rollback`` with the first regressed check as reason (correctness, p99_latency,
        low_confidence, dead_letters); ``keep`` with ``no_regression`` after the window with
        enough judged, or ``insufficient_evidence`` after ``guard_max_watch_s`` without; else ``wait``.
    """
    checks = [check(new, old, thresholds, elapsed_s) for check in CHECKS]
    if adds_labels:
        checks = [_informational(c, "the new version adds labels") if c.name == "low_confidence" else c
                  for c in checks]
    evidence = {"elapsed_s": round(elapsed_s, 3), "new": asdict(new), "old": asdict(old),
                "checks": {c.name: c.evidence for c in checks}}
    regressed = [c.name for c in checks if c.regressed]
    if regressed:
        return Decision(ROLLBACK, regressed[0], {**evidence, "regressed": regressed})
    window = thresholds.guard_window_s
    enough = _enough_judged(new, thresholds)
    if elapsed_s >= window and enough:
        return Decision(KEEP, "no_regression" if old.judged > 0 else "no_baseline", evidence)
    if elapsed_s >= thresholds.guard_watch_limit_s:
        return Decision(KEEP, "insufficient_evidence", evidence)
    return Decision(WAIT, "window_open" if enough else "need_judged", evidence)


# --- the loop -----------------------------------------------------------------------------------
@dataclass
class Watch:
    """A promotion under watch."""

    version: str
    previous: str
    since_ts: float
    generation: int
    next_check: float = 0.0
    adds_labels: bool = False


@dataclass(frozen=True)
class GuardEvent:
    """A final decision the guard took (``keep`` or ``rollback``) and when."""

    version: str
    previous: str
    action: str
    reason: str
    promoted_at: float
    decided_at: float
    rolled_back: bool
    evidence: dict


def promotion_of(pointer: ActivePointer) -> tuple[str, str] | None:
    """(version, replaced version) when the pointer's last change was a promotion over another version."""
    if not pointer.version or not pointer.history or pointer.reason.startswith("rollback"):
        return None
    previous = pointer.history[-1]
    return None if previous == pointer.version else (pointer.version, previous)


class RollbackGuard:
    """Watches every promotion of ``registry`` and rolls back regressions.

    Args:
        settings: the ``guard_*`` settings.
        registry: whose active pointer is followed and rolled back.
        source: where the numbers come from.
        metrics: where rollbacks and decisions are counted.
        clock: unix time (injected in tests).
    """

    def __init__(self, settings: Settings, registry: AdapterRegistry, source: MetricSource, metrics: Metrics,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.registry = registry
        self.source = source
        self.metrics = metrics
        self.clock = clock
        self.watch: Watch | None = None
        self.events: list[GuardEvent] = []
        self._generation: int | None = None
        self._last_error_log = -math.inf

    # --- readiness ---------------------------------------------------------------------------
    def ready(self) -> bool:
        """Ready when the registry pointer can be read and the metric source answers."""
        try:
            self.registry.active()
        except Exception:
            return False
        return self.source.ping()

    # --- pointer changes ---------------------------------------------------------------------
    def observe(self, pointer: ActivePointer, resume: bool = False) -> None:
        """Take note of the active pointer; start watching when it is a new promotion.

        Args:
            pointer: the registry's active pointer.
            resume: the guard just started: watch the active version only if it was promoted
                less than ``guard_max_watch_s`` ago (a restarted guard picks up an open watch).
        """
        if pointer.generation == self._generation:
            return
        self._generation = pointer.generation
        promotion = promotion_of(pointer)
        since = pointer.updated_at or self.clock()
        if promotion is not None and resume and self.clock() - since > self.settings.guard_watch_limit_s:
            promotion = None
        if self.watch is not None and (promotion is None or promotion[0] != self.watch.version):
            logger.info("active pointer moved to %s (%s): no longer watching %s", pointer.version,
                        pointer.reason, self.watch.version)
            self.watch = None
        if promotion is None:
            return
        version, previous = promotion
        self.source.begin(version, previous, since)
        self.watch = Watch(version, previous, since, pointer.generation, next_check=self.clock(),
                           adds_labels=self._adds_labels(version, previous))
        logger.info("watching %s (replaced %s) for %.0f s / %d judged", version, previous,
                    self.settings.guard_window_s, self.settings.guard_min_judged)

    def _adds_labels(self, version: str, previous: str) -> bool:
        """Whether ``version`` has more labels than ``previous`` (the learner records ``labels``)."""
        try:
            counts = [self.registry.show(v).metadata.get("labels") for v in (version, previous)]
        except RegistryError as e:
            logger.warning("cannot read the label counts of %s and %s: %s", version, previous, e)
            return False
        return all(isinstance(c, int) for c in counts) and counts[0] > counts[1]

    # --- checks ------------------------------------------------------------------------------
    def check(self) -> Decision | None:
        """Read the source and decide about the watched promotion (None: nothing watched or no data)."""
        watch = self.watch
        if watch is None:
            return None
        now = self.clock()
        watch.next_check = now + self.settings.guard_poll_s
        try:
            new = self.source.stats(watch.version, watch.since_ts)
            old = self.source.baseline(watch.previous, watch.since_ts)
        except SourceError as e:
            self._log_error("guard cannot read its metrics (%s); still watching %s", e, watch.version)
            return None
        decision = decide(new, old, self.settings, now - watch.since_ts, watch.adds_labels)
        if decision.action == WAIT:
            logger.debug("%s: waiting (%s): %d judged, accuracy %s vs %s", watch.version, decision.reason,
                         new.judged, new.accuracy, old.accuracy)
            return decision
        rolled_back = self._rollback(watch, decision) if decision.action == ROLLBACK else False
        if decision.action == KEEP:
            logger.info("keeping %s (%s): %d judged, accuracy %s vs %s for %s", watch.version, decision.reason,
                        new.judged, _fmt(new.accuracy), _fmt(old.accuracy), watch.previous)
        self.metrics.guard_decisions.labels(action=decision.action, reason=decision.reason).inc()
        self.events.append(GuardEvent(watch.version, watch.previous, decision.action, decision.reason,
                                      watch.since_ts, now, rolled_back, decision.evidence))
        self.watch = None
        return decision

    def _rollback(self, watch: Watch, decision: Decision) -> bool:
        """Roll back ``watch.version`` if it is still the active one; True when done."""
        active = self.registry.active()
        if active.version != watch.version:
            logger.warning("%s regressed (%s) but is no longer active (%s): nothing to roll back",
                           watch.version, decision.reason, active.version)
            return False
        try:
            pointer = self.registry.rollback(reason=f"guard: {decision.reason}")
        except RegistryError as e:
            logger.error("guard could not roll back %s (%s): %s", watch.version, decision.reason, e)
            return False
        self._generation = pointer.generation
        evidence = {"reason": decision.reason, "rolled_back_to": pointer.version, **decision.evidence}
        logger.warning("rolled back %s to %s: %s regressed (%s)", watch.version, pointer.version, decision.reason,
                       _summary(decision))
        self.metrics.rollbacks.labels(reason=decision.reason).inc()
        for record in (lambda: self.registry.mark_rejected(watch.version, evidence),
                       lambda: self.registry.record_cycle({"outcome": "rolled_back", "trigger": "guard",
                                                           "version": watch.version, "rolled_back_to": pointer.version,
                                                           "reason": decision.reason, "ended_at": time.time(),
                                                           "evidence": evidence})):
            try:
                record()
            except Exception as e:  # the rollback itself stands; the annotation is best effort
                logger.error("rollback of %s done but not annotated in the registry: %s", watch.version, e)
        return True

    # --- the loop ----------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Follow the pointer and check watched promotions every ``guard_poll_s`` until ``stop``."""
        try:
            self.observe(self.registry.active(), resume=True)
        except Exception as e:
            self._log_error("guard cannot read the registry pointer: %s", e)
        while not stop.is_set():
            try:
                self.step()
            except Exception as e:  # a registry or source hiccup must not end the guard
                self._log_error("guard step failed: %s", e)
                stop.wait(1.0)
        logger.info("guard stopped")

    def step(self) -> Decision | None:
        """Wait for a pointer change up to the next check, then check if one is due."""
        wait = 1.0
        if self.watch is not None:
            wait = min(wait, max(0.0, self.watch.next_check - self.clock()))
        generation = self._generation if self._generation is not None else -1
        pointer = self.registry.wait_for_change(generation, timeout=wait) if wait > 0 else self.registry.active()
        self.observe(pointer)
        if self.watch is not None and self.clock() >= self.watch.next_check:
            return self.check()
        return None

    def _log_error(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last_error_log >= LOG_EVERY_S:
            self._last_error_log = now
            logger.warning(msg, *args)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _summary(decision: Decision) -> str:
    check = decision.evidence.get("checks", {}).get(decision.reason, {})
    return ", ".join(f"{k}={_fmt(v) if isinstance(v, float) else v}" for k, v in check.items())


# --- wiring -------------------------------------------------------------------------------------
def make_source(settings: Settings, metrics: Metrics) -> MetricSource:
    """Prometheus when ``settings.prometheus_url`` is set, else this process's metrics."""
    lookback = max(DEFAULT_LOOKBACK_S, BASELINE_WINDOWS * settings.guard_window_s)
    if settings.prometheus_url:
        return PrometheusSource(settings.prometheus_url, settings.guard_low_confidence, lookback_s=lookback)
    return InProcessSource(metrics.registry, settings.guard_low_confidence, lookback_s=lookback)


def build_guard(settings: Settings, *, registry: AdapterRegistry | None = None, metrics: Metrics | None = None,
                source: MetricSource | None = None, clock: Callable[[], float] = time.time) -> RollbackGuard:
    """A guard wired from settings; every part can be injected (tests, the demo, the learner).

    Without ``prometheus_url`` the source reads ``metrics.registry``: pass the registry the
    worker and the ingester count into (one process, as in ``loraloop demo``).
    """
    metrics = metrics if metrics is not None else Metrics()
    return RollbackGuard(settings, registry if registry is not None else make_registry(settings),
                         source if source is not None else make_source(settings, metrics), metrics, clock)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``guard`` subcommand (entry point ``loraloop.commands: guard``)."""
    from loraloop.cli import command

    command(subparsers, "guard", run_guard,
            help="Watch every promotion through Prometheus and roll back adapters that hurt users.")


def run_guard(args: argparse.Namespace, settings: Settings) -> int:
    """Run the guard until SIGTERM/SIGINT; ``--metrics-port`` serves /metrics, /healthz, /readyz."""
    from loraloop import __version__
    from loraloop.metrics import serve_http

    if not settings.prometheus_url:
        raise ValueError("loraloop guard reads the workers' metrics through Prometheus: set --prometheus-url "
                         "(LORALOOP_PROMETHEUS_URL); got an empty URL")
    metrics = Metrics()
    metrics.build.info({"version": __version__, "role": "guard"})
    guard = build_guard(settings, metrics=metrics)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: stop.set())
    server = serve_http(metrics.registry, settings.metrics_port, ready=guard.ready) if settings.metrics_port else None
    logger.info("guard up: registry %s, prometheus %s, window %.0f s, %d judged, alpha %g",
                mask_url(settings.registry_url), mask_url(settings.prometheus_url), settings.guard_window_s, settings.guard_min_judged, settings.guard_alpha)
    try:
        guard.run(stop)
    finally:
        if server is not None:
            server.shutdown()
    return 0
