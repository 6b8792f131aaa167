"""The feedback ingester: feedback topic -> join with the request log -> feedback buffer.

One ingester is one member of the consumer group ``settings.ingester_group``. Each event is
decoded, joined to the request it judges (:func:`feedback.join.join`) and appended to the
buffer, which deduplicates event ids. Refused events (invalid, unknown or expired request,
label not allowed, buffer full) go to the dead-letter topic with their reason.

Delivery is **at-least-once, deduplicated**: per partition, the committed offset never
passes a record that is not resolved (appended, duplicate, or dead-lettered with the
broker's acknowledgement). A crash re-reads the uncommitted records; the buffer counts the
already appended ones as duplicates.

Early feedback (its request not logged yet) waits in process and is joined again on later
polls; it holds its partition's commit back for at most ``feedback_grace_s``. When the
request log or the buffer is down (``BufferError``) nothing more is polled or committed:
the ingester backs off and retries the held events, and never crashes.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from feedback.join import Rejection, Retry, join, judgement, paired_judgement, parse_allowed
from loraloop.buffer import BufferError, FeedbackBuffer, RequestLog, make_feedback_buffer, make_request_log
from loraloop.metrics import Metrics
from loraloop.runtime import CachedProbe, RateLimitedLog, close_quietly
from loraloop.schemas import (
    DeadLetter,
    Example,
    FeedbackEvent,
    InvalidMessage,
    ServedRequest,
    decode_feedback,
)
from loraloop.settings import Settings
from loraloop.transport import (
    Consumer,
    Producer,
    Record,
    SendResult,
    TopicPartition,
    Transport,
    TransportError,
    make_transport,
)

logger = logging.getLogger(__name__)

MAX_RECORDS = 500
RETRY_EVERY_S = 0.2  # how often held (early) events are joined again
BACKOFF_S = (0.1, 2.0)  # first and longest wait after the request log or buffer failed
DELIVERY_TIMEOUT_S = 30.0
DEPTH_EVERY_S = 5.0
PING_CACHE_S = 2.0


@dataclass
class _Held:
    """A decoded event not resolved yet (its request is not logged yet, or the store was down)."""

    record: Record | None
    event: FeedbackEvent
    first_seen: float


class FeedbackIngester:
    """One member of the ingesters' consumer group.

    Args:
        settings: topics, group, ``allowed_labels``, ``feedback_grace_s``.
        transport: where feedback comes from and dead letters go.
        request_log: the served requests to join against.
        buffer: where joined examples go.
        metrics: the process's metrics.
        clock: unix time (injected in tests).
    """

    def __init__(self, settings: Settings, *, transport: Transport, request_log: RequestLog,
                 buffer: FeedbackBuffer, metrics: Metrics, clock=time.time) -> None:
        self.settings, self.transport, self.request_log, self.buffer = settings, transport, request_log, buffer
        self.metrics, self.clock = metrics, clock
        self.allowed = parse_allowed(settings.allowed_labels)
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None
        self._held: list[_Held] = []
        self._unacked: list[tuple[SendResult, str, str, Record]] = []  # dead letters sent, not acknowledged
        self._lock = threading.Lock()  # the producer (ingest() may run on other threads)
        self._open: dict[TopicPartition, dict[int, bool]] = {}  # offset -> resolved, not committed yet
        self._committed: dict[TopicPartition, int] = {}
        self._retry_at = 0.0
        self._down_until, self._backoff, self._store_ok = 0.0, 0.0, True
        self._depth_at = -float("inf")
        self._broker_probe = CachedProbe(lambda: self.transport.ping(timeout=2.0), PING_CACHE_S)
        self._stop: threading.Event | None = None
        self._closing = threading.Event()
        self._store_errors = RateLimitedLog(logger)
        self._transport_errors = RateLimitedLog(logger)

    # --- status ------------------------------------------------------------------------
    def ready(self) -> bool:
        """Ready = the request log and buffer answered last time and the broker answers (cached)."""
        if not self._store_ok:
            return False
        return self._broker_probe()

    @property
    def held(self) -> int:
        """Events waiting in process (early feedback, or the store was down)."""
        return len(self._held)

    # --- the loop ------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Ingest until ``stop`` is set, then commit what is resolved and close."""
        self._stop = stop
        try:
            while not stop.is_set():
                try:
                    self.poll_once()
                except Exception as e:  # a bug or a corrupt store entry must not end the loop
                    self._transport_errors(logging.ERROR, "ingester loop failed (%r); reading again from the "
                                           "committed offsets", e)
                    self._reset()
                    self._wait(1.0)
        finally:
            self.close()

    def poll_once(self, timeout_ms: int = 100) -> int:
        """Retry held events, poll and handle one batch, commit; return the records polled.

        Never raises for a broker, request log or buffer failure: those are logged
        (rate-limited), nothing is committed past them, and the next call retries.
        """
        if time.monotonic() < self._down_until:  # the store failed: wait, poll nothing new
            self._wait(self._down_until - time.monotonic())
            if time.monotonic() < self._down_until:
                return 0
        records: list[Record] = []
        try:
            consumer = self._client()
            if self._held and time.monotonic() >= self._retry_at:
                self._held = self._settle_all(self._held)
                self._retry_at = time.monotonic() + RETRY_EVERY_S
            if time.monotonic() >= self._down_until:
                records = consumer.poll(timeout_ms=timeout_ms, max_records=MAX_RECORDS)
            self.handle_batch(records)
        except TransportError as e:
            self._transport_errors(logging.WARNING, "broker unavailable (%s); reading again from the "
                                   "committed offsets", e)
            self._reset()
            self._wait(0.5)
            return 0
        self._update_depth(force=bool(records))
        return len(records)

    def handle_batch(self, records: list[Record]) -> None:
        """Decode, join and buffer a polled batch, dead-letter what is refused, commit what is resolved.

        Raises:
            TransportError: dead letters not acknowledged, or the commit refused (the caller must
                drop the clients: the records are read again from the committed offsets).
        """
        self._client()
        now, fresh = self.clock(), []
        for record in records:
            if not self._track(record):
                continue  # already in flight: delivered again after a rebalance
            try:
                fresh.append(_Held(record, decode_feedback(record.value), now))
            except InvalidMessage as e:
                self._dead_letter(DeadLetter.of(record.value, e, record.topic, record.partition, record.offset),
                                  "invalid", record)
        self._held += self._settle_all(fresh)
        self._acknowledge_letters()
        self._commit()

    def ingest(self, event: FeedbackEvent) -> str:
        """Join and buffer one event directly (no topic): 'joined', 'duplicate' or 'dead_letter'.

        Early feedback is retried until its grace ends.

        Raises:
            BufferError: the request log or the buffer is down (or the ingester closed while waiting).
            TransportError: a dead letter was not acknowledged.
        """
        item = _Held(None, event, self.clock())
        while True:
            outcome = self._settle_one(item)
            if outcome != "retry":
                return outcome
            if self._closing.wait(RETRY_EVERY_S / 4):
                raise BufferError(f"ingester closed while event {event.event_id!r} waited for its request")

    # --- one event -----------------------------------------------------------------------
    def _settle_all(self, items: list[_Held]) -> list[_Held]:
        """Try each event once; return those to hold: the early ones and, once the store fails, the rest."""
        if not items:
            return []
        keep: list[_Held] = []
        joined: list[tuple[_Held, Example, ServedRequest]] = []
        try:  # one round trip to read the request log, one to append: not four per event
            served = self.request_log.get_many([item.event.request_id for item in items])
        except BufferError as e:
            self._store_failed(e)
            return list(items)
        for item in items:
            result = self._join(item, served.get(item.event.request_id))
            if isinstance(result, Retry):
                keep.append(item)
            elif isinstance(result, Example):
                joined.append((item, result, served[item.event.request_id]))
        try:
            statuses = self.buffer.append_many([example for _, example, _ in joined])
        except BufferError as e:  # rejected events are already dead-lettered: hold the rest
            self._store_failed(e)
            return keep + [item for item, _, _ in joined]
        for (item, example, request), status in zip(joined, statuses, strict=True):
            self._after_append(item, example, request, status)
        if not self._store_ok:
            logger.info("request log and feedback buffer answer again")
        self._down_until, self._backoff, self._store_ok = 0.0, 0.0, True
        return keep

    def _join(self, item: _Held, served: ServedRequest | None) -> Example | Retry | str:
        """The example to buffer, Retry, or the outcome of dead-lettering a rejected event."""
        result = join(item.event, served, self.allowed, self.clock(), self.settings.feedback_grace_s,
                      item.first_seen)
        return self._reject(item, result) if isinstance(result, Rejection) else result

    def _settle_one(self, item: _Held) -> str:
        """Join and buffer one event; returns 'joined', 'duplicate', 'dead_letter' or 'retry'."""
        served = self.request_log.get(item.event.request_id)
        result = self._join(item, served)
        if isinstance(result, Retry):
            return "retry"
        if not isinstance(result, Example):
            return result
        return self._after_append(item, result, served, self.buffer.append(result))

    def _after_append(self, item: _Held, result: Example, served: ServedRequest, status: str) -> str:
        event = item.event
        if status == "full":
            return self._reject(item, Rejection("buffer_full", f"buffer holds {self.settings.buffer_max} "
                                                "unacknowledged examples (buffer_trim=reject)"))
        outcome = "joined" if status == "appended" else "duplicate"
        self.metrics.feedback_events.labels(kind=event.kind, outcome=outcome).inc()
        if status == "appended":
            judged, correct = judgement(result)
            self.metrics.judged.labels(adapter_version=result.adapter_version).inc(int(judged))
            self.metrics.correct.labels(adapter_version=result.adapter_version).inc(int(correct))
            self._count_pair(result, served)
        self._resolve(item.record)
        return outcome

    def _count_pair(self, example: Example, served: ServedRequest) -> None:
        pair = paired_judgement(example, served)
        if pair is None:
            return
        outcome = {(True, True): "both_correct", (True, False): "new_only", (False, True): "old_only",
                   (False, False): "both_wrong"}[pair]
        self.metrics.paired_judged.labels(adapter_version=example.adapter_version, outcome=outcome).inc()

    def _reject(self, item: _Held, rejection: Rejection) -> str:
        record, error = item.record, InvalidMessage(rejection.reason, rejection.detail)
        if record is None:  # ingest(): no offsets, wait for the acknowledgement here
            letter = DeadLetter.of(item.event.to_bytes(), error, "direct", -1, -1)
            with self._lock:
                producer = self._client_producer()
                future = producer.send(self.settings.dead_letter_topic, letter.to_bytes())
            producer.flush(timeout=DELIVERY_TIMEOUT_S)
            future.get(timeout=DELIVERY_TIMEOUT_S)
            self._count_letter(item.event.kind, letter.reason)
        else:
            self._dead_letter(DeadLetter.of(record.value, error, record.topic, record.partition, record.offset),
                              item.event.kind, record)
        return "dead_letter"

    def _dead_letter(self, letter: DeadLetter, kind: str, record: Record) -> None:
        """Send a dead letter; it counts (and its record is resolved) once the broker acknowledges it."""
        with self._lock:
            future = self._client_producer().send(self.settings.dead_letter_topic, letter.to_bytes())
        self._unacked.append((future, letter.reason, kind, record))

    def _acknowledge_letters(self) -> None:
        unacked, self._unacked = self._unacked, []
        if not unacked:
            return
        self._producer.flush(timeout=DELIVERY_TIMEOUT_S)
        for future, reason, kind, record in unacked:
            future.get(timeout=DELIVERY_TIMEOUT_S)  # TransportError: not acknowledged, nothing resolved
            self._count_letter(kind, reason)
            self._resolve(record)

    def _count_letter(self, kind: str, reason: str) -> None:
        self.metrics.feedback_events.labels(kind=kind, outcome="dead_letter").inc()
        self.metrics.dead_letters.labels(source="feedback", reason=reason).inc()

    # --- offsets -------------------------------------------------------------------------
    def _track(self, record: Record) -> bool:
        states = self._open.setdefault(record.tp, {})
        if record.offset in states or record.offset < self._committed.get(record.tp, 0):
            return False
        states[record.offset] = False
        return True

    def _resolve(self, record: Record | None) -> None:
        if record is not None and record.offset in self._open.get(record.tp, {}):
            self._open[record.tp][record.offset] = True

    def _commit(self) -> None:
        """Commit, per owned partition, up to the first record that is not resolved."""
        self._forget_lost_partitions()
        offsets: dict[TopicPartition, int] = {}
        for tp, states in self._open.items():
            waiting = [o for o, done in states.items() if not done]
            position = min(waiting) if waiting else max(states, default=-1) + 1
            if position > self._committed.get(tp, 0):
                offsets[tp] = position
        if not offsets:
            return
        self._consumer.commit(offsets)
        self._committed.update(offsets)
        for tp, position in offsets.items():
            self._open[tp] = {o: done for o, done in self._open[tp].items() if o >= position}

    def _forget_lost_partitions(self) -> None:
        """A rebalance took partitions away: their records are the new owner's now."""
        owned = self._consumer.assignment()
        lost = [tp for tp in self._open if tp not in owned]
        if not lost:
            return
        logger.info("partitions %s were reassigned; dropping their uncommitted events", sorted(lost))
        for tp in lost:
            self._open.pop(tp, None)
            self._committed.pop(tp, None)
        self._held = [h for h in self._held if h.record is None or h.record.tp in owned]
        self._unacked = [u for u in self._unacked if u[3].tp in owned]

    # --- clients and failures -------------------------------------------------------------
    def _client(self) -> Consumer:
        if self._consumer is None:
            self._consumer = self.transport.consumer([self.settings.feedback_topic], self.settings.ingester_group)
        with self._lock:
            self._client_producer()
        return self._consumer

    def _client_producer(self) -> Producer:
        if self._producer is None:
            self._producer = self.transport.producer()
        return self._producer

    def _store_failed(self, error: Exception) -> None:
        self._backoff = min(BACKOFF_S[1], max(BACKOFF_S[0], self._backoff * 2))
        self._down_until, self._store_ok = time.monotonic() + self._backoff, False
        self._store_errors(logging.ERROR, "request log or feedback buffer unavailable (%s); nothing committed "
                           "past the held events, retrying in %.1f s", error, self._backoff)

    def _wait(self, seconds: float) -> None:
        (self._stop or self._closing).wait(max(0.0, seconds))

    def _update_depth(self, force: bool) -> None:
        if not force and time.monotonic() - self._depth_at < DEPTH_EVERY_S:
            return
        self._depth_at = time.monotonic()
        try:
            self.metrics.buffer_depth.set(self.buffer.depth())
        except BufferError as e:
            logger.debug("buffer depth unavailable: %s", e)

    def _reset(self) -> None:
        """Drop the clients and every unresolved event: they are read again from the committed offsets."""
        with self._lock:
            consumer, producer = self._consumer, self._producer
            self._consumer = self._producer = None
        self._held, self._unacked, self._open, self._committed = [], [], {}, {}
        close_quietly((consumer, producer), logger)

    def close(self) -> None:
        """Commit what is resolved, then leave the group; held events are read again by the next owner."""
        self._closing.set()
        if self._consumer is not None:
            try:
                self._acknowledge_letters()
                self._commit()
            except TransportError as e:
                logger.warning("final commit failed (the records will be read again): %s", e)
        self._reset()

    def __enter__(self) -> FeedbackIngester:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_ingester(settings: Settings, *, transport: Transport | None = None, request_log: RequestLog | None = None,
                   buffer: FeedbackBuffer | None = None, metrics: Metrics | None = None) -> FeedbackIngester:
    """An ingester wired from settings; every part can be injected (tests, the demo)."""
    return FeedbackIngester(
        settings,
        transport=transport if transport is not None else make_transport(settings),
        request_log=request_log if request_log is not None else make_request_log(settings),
        buffer=buffer if buffer is not None else make_feedback_buffer(settings),
        metrics=metrics if metrics is not None else Metrics(),
    )
