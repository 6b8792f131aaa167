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

* :class:`PrometheusSource` reads every series of each metric through ``/api/v1/query``
  instant queries, evaluated at the promotion time and now (``time=`` parameter), and takes
  the difference *per series* (:meth:`Reading.since`): a series born inside the window counts
  whole (a new version's first scrape is the start of its evidence), and a series that went
  down is a counter reset (a worker restarted): only what it counted since its restart is
  taken. Summing first and differencing after would mix a restarted worker's lost total into
  every other worker's increase (a dead-letter share read against a shrunken consumed count is
  a false regression). A worker that disappears inside the window only takes its evidence
  with it: the guard waits longer.
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


SeriesKey = tuple[tuple[str, str], ...]  # a series' labels (bucket ``le`` and paired ``outcome`` included)
_SCALARS = ("judged", "correct", "served", "consumed", "dead_letters")
_GROUPED = {"latency": "le", "confidence": "le", "paired": "outcome"}  # field -> the label it is summed by


@dataclass(frozen=True)
class Reading:
    """Cumulative values of every series at one time: field of :class:`Counts` -> {series labels -> value}."""

    values: Mapping[str, Mapping[SeriesKey, float]] = field(default_factory=dict)

    def total(self) -> Counts:
        """The readings summed over series (what ``sum(...)`` would answer)."""
        return _to_counts({name: dict(series) for name, series in self.values.items()})

    def since(self, earlier: Reading) -> Counts:
        """What happened between ``earlier`` and this reading, differenced per series.

        A series absent from ``earlier`` counts whole (born since); a series lower than in
        ``earlier`` was reset (its process restarted) and counts what it holds now.
        """
        out: dict[str, dict[SeriesKey, float]] = {}
        for name, series in self.values.items():
            before = earlier.values.get(name, {})
            deltas: dict[SeriesKey, float] = {}
            for key, value in series.items():
                then = before.get(key)
                deltas[key] = value if then is None or value < then else value - then
            out[name] = deltas
        return _to_counts(out)


def _to_counts(values: Mapping[str, Mapping[SeriesKey, float]]) -> Counts:
    scalars = {name: float(sum(values.get(name, {}).values())) for name in _SCALARS}
    grouped: dict[str, dict] = {}
    for name, label in _GROUPED.items():
        sums: dict = {}
        for key, value in values.get(name, {}).items():
            raw = dict(key).get(label, "")
            group = float(raw) if label == "le" else raw
            sums[group] = sums.get(group, 0.0) + value
        grouped[name] = sums
    return Counts(**scalars, **grouped)


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
    def reading(self, version: str, at: float | None = None) -> Reading:
        """Cumulative values of every series of ``version`` (and the unversioned ones) at unix time ``at`` (None: now).

        Raises:
            SourceError: the source cannot be read.
        """

    def counts(self, version: str, at: float | None = None) -> Counts:
        """The :meth:`reading` summed over series."""
        return self.reading(version, at).total()

    def begin(self, version: str, previous: str | None, since_ts: float) -> None:
        """Called when the guard starts watching a promotion (sources that cannot look back record now)."""
        return None

    def ping(self) -> bool:
        """Whether the source answers (readiness)."""
        return True

    def stats(self, version: str, since_ts: float) -> VersionStats:
        """What ``version`` did since ``since_ts`` (its promotion)."""
        window = self.reading(version).since(self.reading(version, since_ts))
        return to_stats(version, window, self.low_confidence)

    def baseline(self, version: str, until_ts: float) -> VersionStats:
        """What ``version`` did in the ``lookback_s`` before ``until_ts`` (the promotion that replaced it)."""
        window = self.reading(version, until_ts).since(self.reading(version, until_ts - self.lookback_s))
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
        self._history: dict[str, list[tuple[float, Reading]]] = {}

    def begin(self, version: str, previous: str | None, since_ts: float) -> None:
        """Read both versions now and file the readings under the promotion time ``since_ts``."""
        for v in {version, previous} - {None}:
            self._remember(v, since_ts, self._read(v))

    def _remember(self, version: str, at: float, reading: Reading) -> None:
        with self._lock:
            history = self._history.setdefault(version, [])
            history.append((at, reading))
            history.sort(key=lambda item: item[0])
            del history[:-100]

    def reading(self, version: str, at: float | None = None) -> Reading:
        if at is None:
            return self._read(version)
        with self._lock:
            earlier = [r for t, r in self._history.get(version, ()) if t <= at]
        return earlier[-1] if earlier else Reading()  # before the first reading: since the process started

    def _read(self, version: str) -> Reading:
        samples = [s for metric in self.registry.collect() for s in metric.samples]
        versioned = {"adapter_version": version}
        return Reading({
            "judged": _series(samples, JUDGED, versioned),
            "correct": _series(samples, CORRECT, versioned),
            "served": _series(samples, SERVED, versioned),
            "consumed": _series(samples, CONSUMED, {}),
            "dead_letters": _series(samples, DEAD_LETTERS, {"source": DEAD_LETTER_SOURCE}),
            "latency": _series(samples, LATENCY + "_bucket", versioned),
            "confidence": _series(samples, CONFIDENCE + "_bucket", versioned),
            "paired": _series(samples, PAIRED, versioned),
        })


def _series(samples: Iterable[object], name: str, match: Mapping[str, str]) -> dict[SeriesKey, float]:
    return {tuple(sorted(s.labels.items())): float(s.value) for s in samples
            if s.name == name and all(s.labels.get(k) == v for k, v in match.items())}


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
        """The PromQL of every reading, by field of :class:`Counts` (exposed for tests and docs).

        Plain selectors, not sums: every series comes back with its labels, so that
        :meth:`Reading.since` can difference each one and see its resets.
        """
        v = _promql_string(version)
        extra = f",{self.selector}" if self.selector else ""
        return {
            "judged": f'{JUDGED}{{adapter_version="{v}"{extra}}}',
            "correct": f'{CORRECT}{{adapter_version="{v}"{extra}}}',
            "served": f'{SERVED}{{adapter_version="{v}"{extra}}}',
            "consumed": f"{CONSUMED}{{{self.selector}}}" if self.selector else CONSUMED,
            "dead_letters": f'{DEAD_LETTERS}{{source="{DEAD_LETTER_SOURCE}"{extra}}}',
            "latency": f'{LATENCY}_bucket{{adapter_version="{v}"{extra}}}',
            "confidence": f'{CONFIDENCE}_bucket{{adapter_version="{v}"{extra}}}',
            "paired": f'{PAIRED}{{adapter_version="{v}"{extra}}}',
        }

    def reading(self, version: str, at: float | None = None) -> Reading:
        values: dict[str, dict[SeriesKey, float]] = {}
        for name, promql in self.queries(version).items():
            values[name] = {tuple(sorted((k, str(v)) for k, v in r["metric"].items() if k != "__name__")): _value(r)
                            for r in self.query(promql, at)}
        return Reading(values)

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
