"""The rollback guard: every promotion serves on probation until the guard has judged it.

Two pieces:

* :func:`decide` is pure: the version on probation's :class:`VersionStats` since its promotion,
  the replaced version's baseline, the thresholds, the time elapsed and the probation's terms
  give a :class:`Decision` -- ``wait``, ``keep``, ``rollback`` or ``insufficient_evidence`` --
  with its reason and evidence.
* :class:`RollbackGuard` does the I/O. It follows the registry's probation state
  (:mod:`loraloop.registry.probation`, in ``pointer.json``), reads the metric source every
  ``guard_poll_s`` and ends the probation through :meth:`AdapterRegistry.end_probation`, the
  pointer's compare-and-set: of two guards judging one probation only one decision is
  recorded, and a rollback goes to the **last kept** version. A guard that restarts resumes
  the probation in the registry and reads its evidence back from the metrics.

The checks (one row each in :data:`CHECKS`):

* **correctness** -- with shadow scoring (the workers also score a share of the requests with
  the replaced adapter) the evidence is the discordant pairs: requests only one of the two
  got right. A mixture sequential probability ratio test on them
  (:func:`loraloop.stats.paired_sequential_p_value`) is valid however often it is looked at,
  so it is looked at on every poll and rolls back as soon as it rejects at its share of
  ``guard_alpha``. Pairs of versions since the last kept one that ended unkept
  (``insufficient_evidence``) are carried in, so small steps down add up. Without shadow
  scoring, new-window vs old-window accuracy (Fisher's exact test) is tested once, at the
  decision;
* **p99 latency** -- end-to-end p99 more than ``guard_max_p99_ratio`` times the old one's (both
  taken as at least :data:`P99_FLOOR_S`), with :data:`P99_MIN_SERVED` predictions a side: a
  threshold, judged once at the decision;
* **low confidence** and **dead letters** -- share rises over their allowance and significant
  (Fisher), tested once at the decision (low confidence is reported, not judged, for a
  version that adds labels).

``guard_alpha`` is the guard's false-rollback rate: the sequential correctness test gets
half of it, each of the two share tests a quarter (a union bound over the tests, each valid
at its level). A version is kept once ``guard_window_s`` passed, its own paired judgements
reached the probation's ``needed`` (``guard_min_judged``) and the replaced adapter was right
on at most ``guard_keep_margin`` more of the pairs; at the probation limit
(``guard_watch_limit_s``) without that, the decision is ``insufficient_evidence``, with the
evidence gathered, never a rollback for want of data. Unreadable metrics are never evidence:
a poll that cannot read them decides nothing (``loraloop_guard_source_errors_total``, a log
line) and the probation runs on to its limit.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Protocol

from loraloop.metrics import Metrics
from loraloop.redact import mask_url
from loraloop.registry import ActivePointer, AdapterRegistry, Probation, RegistryError, make_registry
from loraloop.settings import Settings
from loraloop.stats import paired_sequential_p_value, paired_worse_p_value, worse_p_value
from services.guard_sources import (
    DEFAULT_LOOKBACK_S,
    InProcessSource,
    MetricSource,
    PrometheusSource,
    SourceError,
    VersionStats,
)

__all__ = ["CHECKS", "Decision", "GuardEvent", "INSUFFICIENT", "KEEP", "ROLLBACK", "RollbackGuard", "WAIT",
           "build_guard", "decide", "paired_worse_p_value", "promotion_of", "worse_p_value"]

logger = logging.getLogger(__name__)

WAIT, KEEP, ROLLBACK, INSUFFICIENT = "wait", "keep", "rollback", "insufficient_evidence"
BASELINE_WINDOWS = 3  # the replaced version's baseline spans at least this many windows
P99_FLOOR_S = 0.01  # p99 latencies are compared as at least this (histogram resolution)
P99_MIN_SERVED = 200  # predictions on each side before a p99 is compared (the top 1 % is then 2+ of them)
LOG_EVERY_S = 30.0
CORRECTNESS_ALPHA_SHARE = 0.5  # of guard_alpha; low confidence and dead letters get a quarter each
SHARE_ALPHA_SHARE = 0.25


class GuardThresholds(Protocol):
    """The settings :func:`decide` reads (a :class:`Settings` is one)."""

    guard_window_s: float
    guard_min_judged: int
    guard_watch_limit_s: float
    guard_alpha: float
    guard_keep_margin: float
    guard_max_p99_ratio: float
    guard_max_low_confidence_increase: float
    guard_max_dead_letter_increase: float


@dataclass(frozen=True)
class Decision:
    """What the guard concluded about one probation at one moment."""

    action: str  # wait | keep | rollback | insufficient_evidence
    reason: str
    evidence: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Terms:
    """One probation's terms, as :func:`decide` needs them (defaults: the thresholds')."""

    window_s: float
    limit_s: float
    needed: int
    carried: dict = field(default_factory=dict)  # {"pairs", "new_only", "old_only", "versions"}

    @classmethod
    def of(cls, thresholds: GuardThresholds, probation: Probation | None = None) -> Terms:
        if probation is None:
            return cls(thresholds.guard_window_s, thresholds.guard_watch_limit_s, thresholds.guard_min_judged)
        return cls(probation.window_s, probation.limit_s, probation.needed, probation.carried_pairs())


# --- the decision -------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Check:
    name: str
    regressed: bool
    evidence: dict
    settled: bool = True  # False: not enough to keep on yet (correctness only)


def _own_count(new: VersionStats) -> float:
    """Shadow-scored pairs decide when there are any; plain judged counts only without shadow scoring."""
    return new.paired_judged if new.paired_judged > 0 else new.judged


def _check_correctness(new: VersionStats, old: VersionStats, t: GuardThresholds, terms: Terms,
                       final: bool) -> _Check:
    """Sequential on the discordant pairs (carried ones included) at every look; else a window test at the decision."""
    carried = terms.carried or {}
    pairs = new.paired_judged + float(carried.get("pairs", 0.0))
    if pairs > 0:
        new_only = new.paired_new_only + float(carried.get("new_only", 0.0))
        old_only = new.paired_old_only + float(carried.get("old_only", 0.0))
        drop = (old_only - new_only) / pairs
        p = paired_sequential_p_value(new_only, old_only)
        alpha = t.guard_alpha * CORRECTNESS_ALPHA_SHARE
        evidence = {"paired": True, "sequential": True, "pairs": pairs, "new_only": new_only, "old_only": old_only,
                    "own_pairs": new.paired_judged, "carried_from": list(carried.get("versions", [])),
                    "drop": drop, "keep_margin": t.guard_keep_margin, "p_value": p, "alpha": alpha, "tested": True}
        return _Check("correctness", p < alpha, evidence, settled=drop <= t.guard_keep_margin)
    evidence: dict = {"paired": False, "new_accuracy": new.accuracy, "old_accuracy": old.accuracy,
                      "new_judged": new.judged, "old_judged": old.judged}
    if not final or new.judged < terms.needed or old.judged <= 0:  # a handful of unlucky events never decide
        return _Check("correctness", False, {**evidence, "tested": False})
    alpha = t.guard_alpha * CORRECTNESS_ALPHA_SHARE
    p = worse_p_value(new.correct, new.judged, old.correct, old.judged)
    return _Check("correctness", p < alpha, {**evidence, "tested": True, "p_value": p, "alpha": alpha})


def _check_share_rise(name: str, new_bad: float, new_n: float, old_bad: float, old_n: float,
                      max_increase: float, t: GuardThresholds, final: bool) -> _Check:
    if not final or new_n < t.guard_min_judged or old_n < t.guard_min_judged:
        return _Check(name, False, {"tested": False, "new_n": new_n, "old_n": old_n})
    new_share, old_share = new_bad / new_n, old_bad / old_n
    alpha = t.guard_alpha * SHARE_ALPHA_SHARE
    p = worse_p_value(new_n - new_bad, new_n, old_n - old_bad, old_n)
    rise = new_share - old_share
    return _Check(name, rise > max_increase and p < alpha,
                  {"tested": True, "new_share": new_share, "old_share": old_share, "rise": rise,
                   "max_increase": max_increase, "p_value": p, "alpha": alpha, "new_n": new_n, "old_n": old_n})


def _check_low_confidence(new: VersionStats, old: VersionStats, t: GuardThresholds, terms: Terms,
                          final: bool) -> _Check:
    if new.low_confidence_share is None or old.low_confidence_share is None:
        return _Check("low_confidence", False, {"tested": False, "new_n": new.served, "old_n": old.served})
    return _check_share_rise("low_confidence", new.low_confidence_share * new.served, new.served,
                             old.low_confidence_share * old.served, old.served,
                             t.guard_max_low_confidence_increase, t, final)


def _check_dead_letters(new: VersionStats, old: VersionStats, t: GuardThresholds, terms: Terms,
                        final: bool) -> _Check:
    return _check_share_rise("dead_letters", new.dead_letters, new.consumed, old.dead_letters, old.consumed,
                             t.guard_max_dead_letter_increase, t, final)


def _check_latency(new: VersionStats, old: VersionStats, t: GuardThresholds, terms: Terms, final: bool) -> _Check:
    """p99 ratio, at the decision, with enough predictions on both sides for a p99.

    A p99 of a few dozen predictions is their maximum, and the first seconds after a
    promotion hold the swap's pause: judged on the whole probation, neither can trigger alone.
    """
    evidence: dict = {"new_p99_s": new.p99_latency_s, "old_p99_s": old.p99_latency_s,
                      "max_ratio": t.guard_max_p99_ratio}
    needed = max(t.guard_min_judged, P99_MIN_SERVED)
    if (not final or new.p99_latency_s is None or old.p99_latency_s is None or new.served < needed
            or old.served < needed):
        return _Check("p99_latency", False, {**evidence, "tested": False})
    ratio = max(new.p99_latency_s, P99_FLOOR_S) / max(old.p99_latency_s, P99_FLOOR_S)
    return _Check("p99_latency", ratio > t.guard_max_p99_ratio, {**evidence, "tested": True, "ratio": ratio})


CHECKS: tuple[Callable[[VersionStats, VersionStats, GuardThresholds, Terms, bool], _Check], ...] = (
    _check_correctness, _check_latency, _check_low_confidence, _check_dead_letters)


def _informational(check: _Check, why: str) -> _Check:
    return _Check(check.name, False, {**check.evidence, "ignored": why, "would_regress": check.regressed},
                  check.settled)


def decide(new: VersionStats, old: VersionStats, thresholds: GuardThresholds, elapsed_s: float,
           adds_labels: bool = False, terms: Terms | None = None) -> Decision:
    """Wait, keep, roll back, or give up for want of evidence on a version on probation.

    Args:
        new: the version on probation since its promotion.
        old: the version it replaced (its baseline window).
        thresholds: the ``guard_*`` settings.
        elapsed_s: seconds since the promotion.
        adds_labels: the new version knows labels the old one did not (low confidence is then
            reported, not judged).
        terms: the probation's window, limit, needed pairs and carried evidence (default: the
            thresholds', nothing carried).

    Returns:
        ``rollback`` with the first regressed check as reason; ``keep`` (``no_regression``, or
        ``no_baseline`` when the replaced version has no judged traffic) once the window passed
        with the needed judgements and the drop within ``guard_keep_margin``;
        ``insufficient_evidence`` at the limit without; else ``wait`` (``need_judged``,
        ``window_open``, ``within_margin_not_shown``).
    """
    terms = terms or Terms.of(thresholds)
    enough = _own_count(new) >= terms.needed
    at_limit = elapsed_s >= terms.limit_s
    correctness = _check_correctness(new, old, thresholds, terms, final=False)
    would_keep = enough and elapsed_s >= terms.window_s and correctness.settled
    final = would_keep or at_limit
    checks = [check(new, old, thresholds, terms, final) for check in CHECKS]
    if adds_labels:
        checks = [_informational(c, "the new version adds labels") if c.name == "low_confidence" else c
                  for c in checks]
    evidence = {"elapsed_s": round(elapsed_s, 3), "new": asdict(new), "old": asdict(old),
                "needed": terms.needed, "limit_s": terms.limit_s,
                "paired": {"pairs": new.paired_judged, "new_only": new.paired_new_only,
                           "old_only": new.paired_old_only},
                "checks": {c.name: c.evidence for c in checks}}
    regressed = [c.name for c in checks if c.regressed]
    if regressed:
        return Decision(ROLLBACK, regressed[0], {**evidence, "regressed": regressed})
    if would_keep:
        return Decision(KEEP, "no_regression" if old.judged > 0 or new.paired_judged > 0 else "no_baseline", evidence)
    if at_limit:
        return Decision(INSUFFICIENT, INSUFFICIENT, evidence)
    reason = "need_judged" if not enough else "window_open" if elapsed_s < terms.window_s else \
        "within_margin_not_shown"
    return Decision(WAIT, reason, evidence)


# --- the loop -----------------------------------------------------------------------------------
@dataclass
class Watch:
    """The probation this guard is judging (a copy of the registry's, plus what the guard learned)."""

    probation: Probation
    next_check: float = 0.0
    adds_labels: bool = False
    last_evidence: dict = field(default_factory=dict)  # the newest evidence read: given at the limit if blind
    source_error: str = ""

    @property
    def version(self) -> str:
        return self.probation.version

    @property
    def previous(self) -> str:
        return self.probation.baseline

    @property
    def since_ts(self) -> float:
        return self.probation.started_at


@dataclass(frozen=True)
class GuardEvent:
    """A final decision this guard took (``keep``, ``rollback``, ``insufficient_evidence``) and when.

    ``recorded`` is False when the registry refused it (another guard had decided, or a
    promotion replaced the version); ``rolled_back`` is True only for a recorded rollback.
    """

    version: str
    previous: str
    action: str
    reason: str
    promoted_at: float
    decided_at: float
    rolled_back: bool
    evidence: dict
    recorded: bool = True
    rolled_back_to: str | None = None


def promotion_of(pointer: ActivePointer) -> tuple[str, str] | None:
    """(version, replaced version) when a probation is in progress on the pointer."""
    probation = pointer.current_probation()
    return None if probation is None else (probation.version, probation.baseline)


class RollbackGuard:
    """Judges every probation of ``registry``: keeps, rolls back, or records insufficient evidence.

    Args:
        settings: the ``guard_*`` settings.
        registry: whose probation state is followed and ended.
        source: where the numbers come from.
        metrics: where decisions, rollbacks and source errors are counted.
        clock: unix time (injected in tests).
        name: who decides, as recorded in the registry (default: ``guard@host:pid``).
    """

    def __init__(self, settings: Settings, registry: AdapterRegistry, source: MetricSource, metrics: Metrics,
                 clock: Callable[[], float] = time.time, name: str | None = None) -> None:
        self.settings = settings
        self.registry = registry
        self.source = source
        self.metrics = metrics
        self.clock = clock
        self.name = name or f"guard@{socket.gethostname()}:{os.getpid()}"
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

    # --- following the registry --------------------------------------------------------------
    def observe(self, pointer: ActivePointer, resume: bool = False) -> None:
        """Take note of the pointer: judge its probation, or stop judging one that ended elsewhere.

        Args:
            pointer: the registry's active pointer.
            resume: kept for callers of the previous interface; a probation is always resumed
                from the registry (its start time says which metrics are its evidence).
        """
        if pointer.generation == self._generation:
            return
        self._generation = pointer.generation
        probation = pointer.current_probation()
        if self.watch is not None and (probation is None or probation.version != self.watch.version
                                       or probation.generation != self.watch.probation.generation):
            ended = pointer.last_probation or {}
            if ended.get("version") == self.watch.version:
                logger.info("probation of %s ended elsewhere: %s (%s) by %s", self.watch.version,
                            ended.get("decision"), ended.get("reason"), ended.get("decided_by"))
            self.watch = None
            self.metrics.guard_probation_pairs.set(0)
        if probation is None or self.watch is not None:
            return
        self.source.begin(probation.version, probation.baseline, probation.started_at)
        self.watch = Watch(probation, next_check=self.clock(),
                           adds_labels=self._adds_labels(probation.version, probation.baseline))
        carried = probation.carried_pairs()
        logger.info("judging %s on probation (replaced %s, last kept %s): %d paired judgements needed, window "
                    "%.0f s, limit %.0f s left%s", probation.version, probation.baseline, probation.last_kept,
                    probation.needed, probation.window_s, probation.remaining_s(self.clock()),
                    f", {carried['pairs']:.0f} pairs carried from {carried['versions']}" if carried["pairs"] else "")

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
        """Read the source and judge the probation (None: nothing on probation, or no data this poll)."""
        watch = self.watch
        if watch is None:
            return None
        now = self.clock()
        watch.next_check = now + self.settings.guard_poll_s
        probation = watch.probation
        try:
            new = self.source.stats(watch.version, watch.since_ts)
            old = self.source.baseline(watch.previous, watch.since_ts)
        except SourceError as e:
            return self._blind(watch, now, e)
        if watch.source_error:
            logger.warning("guard reads its metrics again; judging %s on (%.0f s of probation left)", watch.version,
                           probation.remaining_s(now))
            watch.source_error = ""
        decision = decide(new, old, self.settings, now - watch.since_ts, watch.adds_labels,
                          Terms.of(self.settings, probation))
        watch.last_evidence = decision.evidence
        self.metrics.guard_probation_pairs.set(new.paired_judged)
        if decision.action == WAIT:
            logger.debug("%s: waiting (%s): %d pairs of %d, %d judged", watch.version, decision.reason,
                         new.paired_judged, probation.needed, new.judged)
            self._progress(watch, now, decision)
            return decision
        self._finish(watch, decision, now)
        return decision

    def _blind(self, watch: Watch, now: float, error: Exception) -> Decision | None:
        """No metrics this poll: decide nothing, count and log it; at the limit, insufficient evidence."""
        self.metrics.guard_source_errors.inc()
        first = not watch.source_error
        watch.source_error = str(error)
        left = watch.probation.remaining_s(now)
        if first:
            logger.warning("guard cannot read its metrics (%s): no decision on %s without data; its probation runs "
                           "on (%.0f s left)", error, watch.version, left)
        else:
            self._log_error("guard still cannot read its metrics (%s); %s: %.0f s of probation left", error,
                            watch.version, left)
        if left > 0:
            self._progress(watch, now, Decision(WAIT, "metrics_unavailable", watch.last_evidence))
            return None
        evidence = dict(watch.last_evidence or self._stored_evidence(watch))
        evidence.update(metrics_unavailable=str(error), elapsed_s=round(now - watch.since_ts, 3))
        decision = Decision(INSUFFICIENT, INSUFFICIENT, evidence)
        self._finish(watch, decision, now)
        return decision

    def _stored_evidence(self, watch: Watch) -> dict:
        """The evidence an earlier guard recorded as progress (a guard restarted while the metrics are down)."""
        try:
            progress = self.registry.progress() or {}
        except Exception as e:
            logger.warning("cannot read the recorded progress of %s: %s", watch.version, e)
            return {}
        return progress.get("evidence") or {}

    def _progress(self, watch: Watch, now: float, decision: Decision) -> None:
        evidence = decision.evidence
        correctness = evidence.get("checks", {}).get("correctness", {})
        try:
            self.registry.record_progress(watch.version, {
                "generation": watch.probation.generation, "by": self.name, "state": decision.reason,
                "pairs": (evidence.get("paired") or {}).get("pairs", 0.0), "needed": watch.probation.needed,
                "time_left_s": round(watch.probation.remaining_s(now), 1), "p_value": correctness.get("p_value"),
                "drop": correctness.get("drop"), "source_error": watch.source_error or None, "evidence": evidence})
        except Exception as e:  # progress is informational; the decision does not depend on it
            self._log_error("cannot record the probation progress of %s: %s", watch.version, e)

    def _finish(self, watch: Watch, decision: Decision, now: float) -> None:
        """End the probation in the registry; count and annotate only what this guard recorded."""
        try:
            pointer = self.registry.end_probation(watch.version, decision.action, decision.evidence,
                                                  generation=watch.probation.generation, reason=decision.reason,
                                                  by=self.name)
        except RegistryError as e:
            logger.error("guard could not record %s on %s: %s; judging on", decision.action, watch.version, e)
            return
        recorded = pointer is not None
        rolled_back = recorded and decision.action == ROLLBACK
        target = pointer.version if rolled_back else None
        self.events.append(GuardEvent(watch.version, watch.previous, decision.action, decision.reason,
                                      watch.since_ts, now, rolled_back, decision.evidence, recorded, target))
        self.watch = None
        self.metrics.guard_probation_pairs.set(0)
        if not recorded:
            self.metrics.guard_conflicts.inc()
            logger.info("%s on %s not recorded: its probation had already ended (another guard, or a promotion)",
                        decision.action, watch.version)
            return
        self._generation = pointer.generation
        self.metrics.guard_decisions.labels(action=decision.action, reason=decision.reason).inc()
        if decision.action != ROLLBACK:
            logger.info("%s %s (%s): %s", "kept" if decision.action == KEEP else "insufficient evidence on",
                        watch.version, decision.reason, _summary(decision, "correctness"))
            return
        evidence = {"reason": decision.reason, "rolled_back_to": target, **decision.evidence}
        logger.warning("rolled back %s to the last kept version %s: %s regressed (%s)", watch.version, target,
                       decision.reason, _summary(decision, decision.reason))
        self.metrics.rollbacks.labels(reason=decision.reason).inc()
        for record in (lambda: self.registry.mark_rejected(watch.version, evidence),
                       lambda: self.registry.record_cycle({"outcome": "rolled_back", "trigger": "guard",
                                                           "version": watch.version, "rolled_back_to": target,
                                                           "reason": decision.reason, "ended_at": time.time(),
                                                           "evidence": evidence})):
            try:
                record()
            except Exception as e:  # the rollback itself stands; the annotation is best effort
                logger.error("rollback of %s done but not annotated in the registry: %s", watch.version, e)

    # --- the loop ----------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Follow the registry and judge probations every ``guard_poll_s`` until ``stop``."""
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


def _summary(decision: Decision, name: str) -> str:
    check = decision.evidence.get("checks", {}).get(name, {})
    return ", ".join(f"{k}={_fmt(v) if isinstance(v, float) else v}" for k, v in check.items())


# --- wiring -------------------------------------------------------------------------------------
def make_source(settings: Settings, metrics: Metrics) -> MetricSource:
    """Prometheus when ``settings.prometheus_url`` is set, else this process's metrics."""
    lookback = max(DEFAULT_LOOKBACK_S, BASELINE_WINDOWS * settings.guard_window_s)
    if settings.prometheus_url:
        return PrometheusSource(settings.prometheus_url, settings.guard_low_confidence, lookback_s=lookback)
    return InProcessSource(metrics.registry, settings.guard_low_confidence, lookback_s=lookback)


def build_guard(settings: Settings, *, registry: AdapterRegistry | None = None, metrics: Metrics | None = None,
                source: MetricSource | None = None, clock: Callable[[], float] = time.time,
                name: str | None = None) -> RollbackGuard:
    """A guard wired from settings; every part can be injected (tests, the demo, the learner).

    Without ``prometheus_url`` the source reads ``metrics.registry``: pass the registry the
    worker and the ingester count into (one process, as in ``loraloop demo``).
    """
    metrics = metrics if metrics is not None else Metrics()
    return RollbackGuard(settings, registry if registry is not None else make_registry(settings),
                         source if source is not None else make_source(settings, metrics), metrics, clock, name)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``guard`` subcommand (entry point ``loraloop.commands: guard``)."""
    from loraloop.cli import command

    command(subparsers, "guard", run_guard,
            help="Judge every promotion on probation through Prometheus: keep it, or roll back to the last kept "
                 "version.")


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
    logger.info("guard %s up: registry %s, prometheus %s, window %.0f s, %d paired judgements, limit %.0f s, "
                "alpha %g", guard.name, mask_url(settings.registry_url), mask_url(settings.prometheus_url),
                settings.guard_window_s, settings.guard_min_judged, settings.guard_watch_limit_s, settings.guard_alpha)
    try:
        guard.run(stop)
    finally:
        if server is not None:
            server.shutdown()
    return 0
