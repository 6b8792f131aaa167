"""Where the rollback guard reads its numbers: the Prometheus HTTP API or this process's metrics.

Both sources answer the same two questions with the same arithmetic:

* :meth:`MetricSource.stats` -- what happened to ``version`` since it was promoted at ``since_ts``;
* :meth:`MetricSource.baseline` -- what happened before ``since_ts`` (the replaced version).

Each source only reads *cumulative* counters at a point in time (:class:`Counts`:
judged, correct, served, consumed, dead letters and the cumulative buckets of the
end-to-end latency and confidence histograms); a window is the difference of two
readings and :func:`to_stats` turns it into a :class:`VersionStats` (p99 interpolated
inside the buckets the way PromQL's ``histogram_quantile`` does, low-confidence share
at ``settings.guard_low_confidence``). So the embedded demo and production decide on
exactly the same quantities.

* :class:`PrometheusSource` reads ``sum(...)`` instant queries through ``/api/v1/query``,
  evaluated at the promotion time and now (``time=`` parameter). Differences of two
  readings are exact for counter series that exist over the whole window; unlike
  ``increase()`` they also count what a brand-new version's series held at its first
  scrape (a new version's first scrape is the start of its evidence). A worker that
  restarts or disappears inside the window makes its counts shrink: deltas are clamped
  at zero, so that only makes the guard wait longer.
* :class:`InProcessSource` reads a ``CollectorRegistry`` (the demo's one process); it keeps
  readings taken when the guard first saw a promotion (:meth:`MetricSource.begin`) and
  answers earlier times with the nearest earlier reading (zero before the first).

Versioned metrics (judged, correct, served, latency, confidence) carry an
``adapter_version`` label; consumed requests and dead letters do not, so their shares
are compared by time window (after vs before the promotion).
"""

from __future__ import annotations

import abc
import bisect
import logging
import math
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

logger = logging.getLogger(__name__)

# Metric names the guard reads (tests check them against loraloop.metrics.METRIC_NAMES).
JUDGED = "loraloop_judged_total"
CORRECT = "loraloop_correct_total"
SERVED = "loraloop_requests_served_total"
CONSUMED = "loraloop_requests_consumed_total"
DEAD_LETTERS = "loraloop_dead_letters_total"
LATENCY = "loraloop_end_to_end_seconds"
CONFIDENCE = "loraloop_prediction_confidence"
PAIRED = "loraloop_paired_judged_total"
GUARD_METRICS = (JUDGED, CORRECT, SERVED, CONSUMED, DEAD_LETTERS, LATENCY, CONFIDENCE, PAIRED)
PAIRED_OUTCOMES = ("both_correct", "new_only", "old_only", "both_wrong")
DEAD_LETTER_SOURCE = "requests"  # worker dead letters; the feedback path's ones are not a serving regression
DEFAULT_LOOKBACK_S = 600.0


class SourceError(RuntimeError):
    """The metric source could not be read (Prometheus down, bad answer)."""


@dataclass(frozen=True)
class VersionStats:
    """What one adapter version did over one window; the guard's only input."""

    version: str | None = None
    judged: float = 0.0
    correct: float = 0.0
    consumed: float = 0.0
    dead_letters: float = 0.0
    p99_latency_s: float | None = None
    low_confidence_share: float | None = None
    served: float = 0.0
    # Shadow-scored judged requests (the replaced adapter also answered them): who was right.
    paired_judged: float = 0.0
    paired_new_only: float = 0.0  # only this version was right
    paired_old_only: float = 0.0  # only the replaced version was right

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.judged if self.judged > 0 else None

    @property
    def dead_letter_share(self) -> float | None:
        return self.dead_letters / self.consumed if self.consumed > 0 else None


@dataclass(frozen=True)
class Counts:
    """Cumulative readings at one time; buckets map an upper bound ``le`` to a cumulative count."""

    judged: float = 0.0
    correct: float = 0.0
    served: float = 0.0
    consumed: float = 0.0
    dead_letters: float = 0.0
    latency: Mapping[float, float] = field(default_factory=dict)
    confidence: Mapping[float, float] = field(default_factory=dict)
    paired: Mapping[str, float] = field(default_factory=dict)  # outcome -> count

    def minus(self, earlier: Counts) -> Counts:
        """This reading less an earlier one, clamped at zero (a counter never goes down)."""
        def sub(a: float, b: float) -> float:
            return max(0.0, a - b)

        def sub_buckets(a: Mapping[float, float], b: Mapping[float, float]) -> dict[float, float]:
            return {le: sub(v, b.get(le, 0.0)) for le, v in a.items()}

        return Counts(sub(self.judged, earlier.judged), sub(self.correct, earlier.correct),
                      sub(self.served, earlier.served), sub(self.consumed, earlier.consumed),
                      sub(self.dead_letters, earlier.dead_letters), sub_buckets(self.latency, earlier.latency),
                      sub_buckets(self.confidence, earlier.confidence), sub_buckets(self.paired, earlier.paired))


def bucket_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """``histogram_quantile`` on cumulative buckets: linear inside the bucket holding rank ``q``.

    Returns None without observations. A rank in the ``+Inf`` bucket answers the largest
    finite bound (as Prometheus does).
    """
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    cumulative = _monotone([buckets[b] for b in bounds])
    rank = q * cumulative[-1]
    i = bisect.bisect_left(cumulative, rank)
    i = min(i, len(bounds) - 1)
    upper = bounds[i]
    if math.isinf(upper):
        finite = [b for b in bounds if not math.isinf(b)]
        return finite[-1] if finite else None
    lower = bounds[i - 1] if i > 0 else 0.0
    below = cumulative[i - 1] if i > 0 else 0.0
    in_bucket = cumulative[i] - below
    if in_bucket <= 0:
        return upper
    return lower + (upper - lower) * (rank - below) / in_bucket


def share_below(threshold: float, buckets: Mapping[float, float]) -> float | None:
    """Share of observations at or below ``threshold`` (linear inside a bucket); None without any."""
    bounds = sorted(buckets)
    if not bounds:
        return None
    cumulative = _monotone([buckets[b] for b in bounds])
    total = cumulative[-1]
    if total <= 0:
        return None
    lower, below = 0.0, 0.0
    for bound, cum in zip(bounds, cumulative, strict=True):
        if threshold <= bound:
            if math.isinf(bound) or bound == lower:
                return cum / total
            return (below + (cum - below) * (threshold - lower) / (bound - lower)) / total
        lower, below = bound, cum
    return 1.0


def _monotone(values: list[float]) -> list[float]:
    """Cumulative bucket counts made non-decreasing (readings at slightly different times can dip)."""
    out, top = [], 0.0
    for v in values:
        top = max(top, v)
        out.append(top)
    return out


def to_stats(version: str | None, window: Counts, low_confidence: float) -> VersionStats:
    """The window's counts as :class:`VersionStats`."""
    return VersionStats(version=version, judged=window.judged, correct=window.correct, consumed=window.consumed,
                        dead_letters=window.dead_letters, p99_latency_s=bucket_quantile(0.99, window.latency),
                        low_confidence_share=share_below(low_confidence, window.confidence), served=window.served,
                        paired_judged=sum(window.paired.values()), paired_new_only=window.paired.get("new_only", 0.0),
                        paired_old_only=window.paired.get("old_only", 0.0))


class MetricSource(abc.ABC):
    """Counts per adapter version at a point in time; windows are differences of two readings.

    Args:
        low_confidence: a prediction scoring at or below this counts as low-confidence.
        lookback_s: length of the window before a promotion used as the replaced version's baseline.
    """

    def __init__(self, low_confidence: float, lookback_s: float = DEFAULT_LOOKBACK_S) -> None:
        self.low_confidence = low_confidence
        self.lookback_s = lookback_s

    @abc.abstractmethod
    def counts(self, version: str, at: float | None = None) -> Counts:
        """Cumulative counts of ``version`` (and the unversioned totals) at unix time ``at`` (None: now).

        Raises:
            SourceError: the source cannot be read.
        """

    def begin(self, version: str, previous: str | None, since_ts: float) -> None:
        """Called when the guard starts watching a promotion (sources that cannot look back record now)."""
        return None

    def ping(self) -> bool:
        """Whether the source answers (readiness)."""
        return True

    def stats(self, version: str, since_ts: float) -> VersionStats:
        """What ``version`` did since ``since_ts`` (its promotion)."""
        window = self.counts(version).minus(self.counts(version, since_ts))
        return to_stats(version, window, self.low_confidence)

    def baseline(self, version: str, until_ts: float) -> VersionStats:
        """What ``version`` did in the ``lookback_s`` before ``until_ts`` (the promotion that replaced it)."""
        window = self.counts(version, until_ts).minus(self.counts(version, until_ts - self.lookback_s))
        return to_stats(version, window, self.low_confidence)


# --- in-process -------------------------------------------------------------------------------
class InProcessSource(MetricSource):
    """Reads the counters of this process's ``CollectorRegistry`` (the embedded path).

    A registry has no history: a reading for a past time is the latest one this source
    filed at or before it (:meth:`begin` reads both versions when the guard sees a
    promotion and files that under the promotion time; what was served between the two
    is counted as before). Before the first reading a counter is 0: the process's totals.
    """

    def __init__(self, registry: CollectorRegistry, low_confidence: float,
                 lookback_s: float = DEFAULT_LOOKBACK_S) -> None:
        super().__init__(low_confidence, lookback_s)
        self.registry = registry
        self._lock = threading.Lock()
        self._history: dict[str, list[tuple[float, Counts]]] = {}

    def begin(self, version: str, previous: str | None, since_ts: float) -> None:
        """Read both versions now and file the readings under the promotion time ``since_ts``."""
        for v in {version, previous} - {None}:
            self._remember(v, since_ts, self._read(v))

    def _remember(self, version: str, at: float, counts: Counts) -> None:
        with self._lock:
            history = self._history.setdefault(version, [])
            history.append((at, counts))
            history.sort(key=lambda item: item[0])
            del history[:-100]

    def counts(self, version: str, at: float | None = None) -> Counts:
        if at is None:
            return self._read(version)
        with self._lock:
            earlier = [c for t, c in self._history.get(version, ()) if t <= at]
        return earlier[-1] if earlier else Counts()  # before the first reading: since the process started

    def _read(self, version: str) -> Counts:
        samples = [s for metric in self.registry.collect() for s in metric.samples]
        return Counts(
            judged=_sum(samples, JUDGED, {"adapter_version": version}),
            correct=_sum(samples, CORRECT, {"adapter_version": version}),
            served=_sum(samples, SERVED, {"adapter_version": version}),
            consumed=_sum(samples, CONSUMED, {}),
            dead_letters=_sum(samples, DEAD_LETTERS, {"source": DEAD_LETTER_SOURCE}),
            latency=_buckets(samples, LATENCY + "_bucket", version),
            confidence=_buckets(samples, CONFIDENCE + "_bucket", version),
            paired={o: _sum(samples, PAIRED, {"adapter_version": version, "outcome": o}) for o in PAIRED_OUTCOMES},
        )


def _sum(samples: Iterable[object], name: str, match: Mapping[str, str]) -> float:
    return float(sum(s.value for s in samples
                     if s.name == name and all(s.labels.get(k) == v for k, v in match.items())))


def _buckets(samples: Iterable[object], name: str, version: str) -> dict[float, float]:
    out: dict[float, float] = {}
    for s in samples:
        if s.name == name and s.labels.get("adapter_version") == version:
            le = float(s.labels["le"])
            out[le] = out.get(le, 0.0) + s.value
    return out


# --- Prometheus ---------------------------------------------------------------------------------
class PrometheusSource(MetricSource):
    """Reads the counters through the Prometheus HTTP API (``/api/v1/query``), the production path.

    Args:
        url: the Prometheus base URL, such as ``http://prometheus:9090``.
        low_confidence: see :class:`MetricSource`.
        lookback_s: see :class:`MetricSource`.
        timeout_s: HTTP timeout of one query.
        selector: extra label matchers added to every query (for example ``job="loraloop"``).
    """

    def __init__(self, url: str, low_confidence: float, lookback_s: float = DEFAULT_LOOKBACK_S,
                 timeout_s: float = 5.0, selector: str = "") -> None:
        super().__init__(low_confidence, lookback_s)
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.selector = selector
        import requests

        self._http = requests.Session()

    def queries(self, version: str) -> dict[str, str]:
        """The PromQL of every reading, by field of :class:`Counts` (exposed for tests and docs)."""
        v = _promql_string(version)
        extra = f",{self.selector}" if self.selector else ""
        return {
            "judged": f'sum({JUDGED}{{adapter_version="{v}"{extra}}})',
            "correct": f'sum({CORRECT}{{adapter_version="{v}"{extra}}})',
            "served": f'sum({SERVED}{{adapter_version="{v}"{extra}}})',
            "consumed": f"sum({CONSUMED}{{{self.selector}}})" if self.selector else f"sum({CONSUMED})",
            "dead_letters": f'sum({DEAD_LETTERS}{{source="{DEAD_LETTER_SOURCE}"{extra}}})',
            "latency": f'sum by (le) ({LATENCY}_bucket{{adapter_version="{v}"{extra}}})',
            "confidence": f'sum by (le) ({CONFIDENCE}_bucket{{adapter_version="{v}"{extra}}})',
            "paired": f'sum by (outcome) ({PAIRED}{{adapter_version="{v}"{extra}}})',
        }

    def counts(self, version: str, at: float | None = None) -> Counts:
        values: dict[str, object] = {}
        for name, promql in self.queries(version).items():
            result = self.query(promql, at)
            if name in {"latency", "confidence"}:
                values[name] = {float(r["metric"]["le"]): _value(r) for r in result}
            elif name == "paired":
                values[name] = {str(r["metric"].get("outcome", "")): _value(r) for r in result}
            else:
                values[name] = sum(_value(r) for r in result)
        return Counts(**values)

    def query(self, promql: str, at: float | None = None) -> list[dict]:
        """One instant query; the ``result`` list of a vector answer.

        Raises:
            SourceError: Prometheus unreachable, an HTTP error, or a non-success answer.
        """
        params = {"query": promql}
        if at is not None:
            params["time"] = f"{at:.3f}"
        try:
            response = self._http.get(f"{self.url}/api/v1/query", params=params, timeout=self.timeout_s)
            body = response.json()
        except Exception as e:  # requests errors, bad JSON
            raise SourceError(f"prometheus query {promql!r} at {self.url} failed: {e}") from e
        if response.status_code != 200 or body.get("status") != "success":
            raise SourceError(f"prometheus query {promql!r} answered {response.status_code}: "
                              f"{body.get('errorType', '')} {body.get('error', body)}")
        data = body.get("data", {})
        if data.get("resultType") != "vector":
            raise SourceError(f"prometheus query {promql!r} gave a {data.get('resultType')!r}, expected a vector")
        return list(data.get("result", []))

    def ping(self) -> bool:
        try:
            return self._http.get(f"{self.url}/-/ready", timeout=self.timeout_s).status_code == 200
        except Exception:
            return False


def _value(result: Mapping[str, object]) -> float:
    value = float(result["value"][1])  # type: ignore[index]
    return value if math.isfinite(value) else 0.0


def _promql_string(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')
