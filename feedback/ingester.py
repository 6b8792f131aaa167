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

Durability: an offset is committed only after the buffer confirmed the append durable
(:meth:`~loraloop.buffer.FeedbackBuffer.durability`: WAITAOF, fsync-always, or WAIT on a
replica). Without persistence the ingester refuses to start (``buffer_require_durable``),
or, when allowed, warns, exports ``buffer_durable 0`` and counts what a restart lost
(``buffer_lost``). Feedback whose request is missing after the request log was seen down
or restarted waits up to ``feedback_store_retry_s`` and is then dead-lettered as
``request_log_unavailable`` (replayable), not ``unknown_request``.

Every per-record step (decode, join, append, dead letter) runs inside a per-record error
boundary: a record that raises anything becomes one dead letter (``ingest_error`` when it
is not a refusal with its own reason) and its offset is committed; a failing batch call is
retried one record at a time so that only the offending record is refused.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from feedback.join import Rejection, Retry, join, judgement, paired_judgement, parse_allowed
from loraloop.buffer import (
    BufferError,
    Durability,
    FeedbackBuffer,
    RequestLog,
    make_feedback_buffer,
    make_request_log,
    request_log_ttl,
)
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
OUTAGE_MERGE_S = 5.0  # request log failures closer than this form one outage


class NotDurable(RuntimeError):
    """The buffer would lose acknowledged appends in a restart and ``buffer_require_durable`` is on."""


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
        self._record_errors = RateLimitedLog(logger)
        self._durability: Durability | None = None
        self._instance: str | None = None  # the buffer store's id: a change is a restart
        self._last_depth = 0
        self._unsampled = 0  # appended since the last depth sample (a restart may lose them too)
        self._appended = False  # appended since the last depth sample
        self._started = self.clock()
        self._log_started: float | None = None
        self._outages: list[list[float]] = []  # [first, last] unix times the request log was seen failing
        self._failed_lookups: dict[str, Exception] = {}

    # --- status ------------------------------------------------------------------------
    def ready(self) -> bool:
        """Ready = the request log and buffer answered last time and the broker answers (cached)."""
        if not self._store_ok:
            return False
        return self._broker_probe()

    def check_durability(self) -> Durability:
        """Ask the buffer how appends survive a restart; refuse (NotDurable) or warn when they do not.

        Raises:
            NotDurable: no persistence and ``buffer_require_durable`` is on.
            BufferError: the buffer's store is down (checked again before the next append).
        """
        durability = self.buffer.durability()
        first = self._durability is None or self._durability.mode != durability.mode
        self._durability = durability
        self.metrics.buffer_durable.set(int(durability.durable))
        if not durability.durable:
            if self.settings.buffer_require_durable:
                raise NotDurable(f"the feedback buffer is not durable: {durability.detail}. Committed feedback "
                                 "would be lost in a restart; enable appendonly (or a replica), or set "
                                 "buffer_require_durable=false to accept and count the loss")
            if first:
                logger.error("FEEDBACK BUFFER NOT DURABLE: %s. Offsets are committed after appends that a "
                             "restart loses; losses are counted in loraloop_buffer_lost_total "
                             "(buffer_require_durable=false)", durability.detail)
        elif first:
            logger.info("feedback buffer durability: %s (%s)", durability.mode, durability.detail)
        return durability

    @property
    def held(self) -> int:
        """Events waiting in process (early feedback, or the store was down)."""
        return len(self._held)

    # --- the loop ------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Ingest until ``stop`` is set, then commit what is resolved and close."""
        self._stop = stop
        try:
            try:
                self.check_durability()
            except BufferError as e:  # checked again before the first append
                logger.warning("feedback buffer unreachable at start, its durability is checked later: %s", e)
            while not stop.is_set():
                try:
                    self.poll_once()
                except NotDurable:
                    raise
                except Exception as e:  # a bug outside the per-record boundaries must not end the loop
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
                self._dead_letter(self._letter(record.value, e, record), "invalid", record)
            except Exception as e:  # a decoder bug: this record is refused, the partition goes on
                self._dead_letter(self._letter(record.value, self._failure("decode", e, record), record),
                                  "invalid", record)
        self._held += self._settle_all(fresh)
        self.metrics.feedback_held.set(len(self._held))
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
        """Try each event once; return those to hold: the early ones and, once the store fails, the rest.

        One round trip reads the request log and one appends, not four per event; where a batch
        call raises something other than the store being down, it is redone one event at a time
        so that only the event that raises is dead-lettered (``ingest_error``).
        """
        if not items:
            return []
        try:
            served = self._lookup(items)
        except BufferError as e:
            self._store_failed(e, request_log=True)
            return list(items)
        keep: list[_Held] = []
        joined: list[tuple[_Held, Example, ServedRequest]] = []
        for item in items:
            if item.event.request_id not in served and item.event.request_id in self._failed_lookups:
                self._refuse(item, "request log lookup", self._failed_lookups[item.event.request_id])
                continue
            try:
                result = self._join(item, served.get(item.event.request_id))
            except Exception as e:  # noqa: BLE001 - the per-record boundary
                self._refuse(item, "join", e)
                continue
            if isinstance(result, Retry):
                keep.append(item)
            elif isinstance(result, Example):
                joined.append((item, result, served[item.event.request_id]))
        try:
            if joined:
                self._ensure_durability()
            statuses = self._append([example for _, example, _ in joined])
        except BufferError as e:  # rejected events are already dead-lettered: hold the rest
            self._store_failed(e)
            return keep + [item for item, _, _ in joined]
        held_back = []
        for (item, example, request), status in zip(joined, statuses, strict=True):
            if isinstance(status, BufferError):
                held_back.append(item)
            elif isinstance(status, Exception):
                self._refuse(item, "buffer append", status)
            else:
                try:
                    self._after_append(item, example, request, status)
                except Exception as e:  # noqa: BLE001 - appended: resolve it, only its accounting failed
                    self._record_errors(logging.ERROR, "event %r appended but not counted: %r",
                                        item.event.event_id, e)
                    self._resolve(item.record)
        if held_back:
            self._store_failed(next(s for s in statuses if isinstance(s, BufferError)))
            return keep + held_back
        if not self._store_ok:
            logger.info("request log and feedback buffer answer again")
        self._down_until, self._backoff, self._store_ok = 0.0, 0.0, True
        if self._outages and self._outages[-1][1] == float("inf"):
            self._outages[-1][1] = self.clock()
        return keep

    def _lookup(self, items: list[_Held]) -> dict[str, ServedRequest]:
        """The served requests of ``items``; ids whose own lookup raised go to ``_failed_lookups``.

        Raises:
            BufferError: the request log is down.
        """
        self._failed_lookups: dict[str, Exception] = {}
        ids = [item.event.request_id for item in items]
        try:
            return self.request_log.get_many(ids)
        except BufferError:
            raise
        except Exception as e:  # noqa: BLE001 - one id the store cannot take (or a corrupt entry): find it
            self._record_errors(logging.WARNING, "request log batch read failed (%r); reading one at a time", e)
        served: dict[str, ServedRequest] = {}
        for request_id in dict.fromkeys(ids):
            try:
                found = self.request_log.get(request_id)
            except BufferError:
                raise
            except Exception as e:  # noqa: BLE001 - the per-record boundary
                self._failed_lookups[request_id] = e
                continue
            if found is not None:
                served[request_id] = found
        return served

    def _append(self, examples: list[Example]) -> list[str | Exception]:
        """``buffer.append_many``; where it raises (not the store being down), one append per example.

        Returns a status per example, or the exception its own append raised (a BufferError for the
        examples not tried once the store failed).

        Raises:
            BufferError: the store is down (the batch call failed).
        """
        if not examples:
            return []
        try:
            return list(self.buffer.append_many(examples))
        except BufferError:
            raise
        except Exception as e:  # noqa: BLE001 - one example the store cannot take: find it
            self._record_errors(logging.WARNING, "buffer batch append failed (%r); appending one at a time", e)
        out: list[str | Exception] = []
        for example in examples:
            if out and isinstance(out[-1], BufferError):
                out.append(out[-1])
                continue
            try:
                out.append(self.buffer.append(example))
            except Exception as e:  # noqa: BLE001 - the per-record boundary (BufferError: hold the rest)
                out.append(e)
        return out

    def _ensure_durability(self) -> None:
        if self._durability is None:
            self.check_durability()

    def _join(self, item: _Held, served: ServedRequest | None) -> Example | Retry | str:
        """The example to buffer, Retry, or the outcome of dead-lettering a rejected event."""
        result = join(item.event, served, self.allowed, self.clock(), self.settings.feedback_grace_s,
                      item.first_seen, self.settings.feedback_store_retry_s,
                      self._outage_of(item.event) if served is None else None)
        return self._reject(item, result) if isinstance(result, Rejection) else result

    def _outage_of(self, event: FeedbackEvent) -> str | None:
        """What the request log went through that may have lost ``event``'s request, or None.

        Evidence: failures this ingester saw reading it, and a restart of the store while this
        ingester ran, after the request could have been logged (within its TTL before the event).
        """
        since = event.ts - request_log_ttl(self.settings)
        for first, last in reversed(self._outages):
            if last >= since:
                end = "now" if last == float("inf") else f"{last:.0f}"
                return f"was unreachable (unix time {first:.0f} to {end})"
        try:
            started = self.request_log.started_at()
        except Exception as e:  # noqa: BLE001 - unknown is not evidence; the read itself just worked
            logger.debug("request log start time unavailable: %s", e)
            return None
        if started is not None and started > max(self._started + 1.0, since):  # uptime has 1 s steps
            if self._log_started != started:
                self._log_started = started
                logger.warning("the request log restarted at unix time %.0f, while this ingester ran: feedback "
                               "on requests it lost is retried for %.0f s", started,
                               self.settings.feedback_store_retry_s)
            return f"restarted at unix time {started:.0f}"
        return None

    def _settle_one(self, item: _Held) -> str:
        """Join and buffer one event; returns 'joined', 'duplicate', 'dead_letter' or 'retry'."""
        try:
            served = self.request_log.get(item.event.request_id)
        except BufferError as e:
            self._store_failed(e, request_log=True)
            raise
        result = self._join(item, served)
        if isinstance(result, Retry):
            return "retry"
        if not isinstance(result, Example):
            return result
        self._ensure_durability()
        return self._after_append(item, result, served, self.buffer.append(result))

    def _after_append(self, item: _Held, result: Example, served: ServedRequest, status: str) -> str:
        event = item.event
        if status == "full":
            return self._reject(item, Rejection("buffer_full", f"buffer holds {self.settings.buffer_max} "
                                                "unacknowledged examples (buffer_trim=reject)"))
        self._appended = True
        self._unsampled += status == "appended"
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

    def _refuse(self, item: _Held, step: str, error: Exception) -> None:
        """Dead-letter an event whose ``step`` raised: the per-record boundary."""
        self._record_errors(logging.WARNING, "feedback event %r refused: %s raised %r", item.event.event_id,
                            step, error)
        self._reject(item, Rejection("ingest_error", f"{step} raised {type(error).__name__}: {error!r}"[:2000]))

    def _failure(self, step: str, error: Exception, record: Record) -> InvalidMessage:
        self._record_errors(logging.WARNING, "record %s[%d]@%d refused: %s raised %r", record.topic,
                            record.partition, record.offset, step, error)
        return InvalidMessage("ingest_error", f"{step} raised {type(error).__name__}: {error!r}"[:2000])

    def _letter(self, raw: bytes, error: InvalidMessage, record: Record | None) -> DeadLetter:
        """The dead letter of ``raw`` (redacted when ``redact_dead_letters`` is on); never raises."""
        topic, partition, offset = (record.topic, record.partition, record.offset) if record else ("direct", -1, -1)
        redact = self.settings.redact_dead_letters
        try:
            letter = DeadLetter.of(raw, error, topic, partition, offset, redact=redact,
                                   key=self.settings.redaction_key.get_secret_value())
            letter.to_bytes()  # it must serialize: a lone surrogate would raise only when sent
            return letter
        except Exception as e:  # noqa: BLE001 - a dead letter must always be sent
            text = "" if redact else raw[:4096].decode("utf-8", "backslashreplace")
            detail = error.detail.encode("utf-8", "backslashreplace").decode()
            logger.debug("dead letter fell back to an escaped payload: %r", e)
            return DeadLetter(payload=text, reason=error.reason, detail=detail, source_topic=topic,
                              partition=partition, offset=offset)

    def _reject(self, item: _Held, rejection: Rejection) -> str:
        record, error = item.record, InvalidMessage(rejection.reason, rejection.detail)
        if record is None:  # ingest(): no offsets, wait for the acknowledgement here
            try:
                raw = item.event.to_bytes()
            except Exception:  # noqa: BLE001 - an event that cannot be serialized: keep what can be
                raw = repr(item.event).encode("utf-8", "backslashreplace")
            letter = self._letter(raw, error, None)
            with self._lock:
                producer = self._client_producer()
                future = producer.send(self.settings.dead_letter_topic, letter.to_bytes())
            producer.flush(timeout=DELIVERY_TIMEOUT_S)
            future.get(timeout=DELIVERY_TIMEOUT_S)
            self._count_letter(item.event.kind, letter.reason)
        else:
            self._dead_letter(self._letter(record.value, error, record), item.event.kind, record)
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

    def _store_failed(self, error: Exception, request_log: bool = False) -> None:
        if request_log:  # evidence that entries written meanwhile may be missing (see _outage_of)
            now = self.clock()
            if self._outages and self._outages[-1][1] >= now - OUTAGE_MERGE_S:
                self._outages[-1][1] = float("inf")
            else:
                self._outages.append([now, float("inf")])
            self._outages = self._outages[-100:]
        self._backoff = min(BACKOFF_S[1], max(BACKOFF_S[0], self._backoff * 2))
        self._down_until, self._store_ok = time.monotonic() + self._backoff, False
        self._store_errors(logging.ERROR, "request log or feedback buffer unavailable (%s); nothing committed "
                           "past the held events, retrying in %.1f s", error, self._backoff)

    def _wait(self, seconds: float) -> None:
        (self._stop or self._closing).wait(max(0.0, seconds))

    def _update_depth(self, force: bool) -> None:
        """Export depth and drops; notice a restart of the buffer's store (and count its loss when not durable)."""
        force, self._appended = force or self._appended, False
        if not force and time.monotonic() - self._depth_at < DEPTH_EVERY_S:
            return
        self._depth_at = time.monotonic()
        try:
            instance = self.buffer.instance_id()
            depth = self.buffer.depth()
            dropped = self.buffer.take_dropped()
        except BufferError as e:
            logger.debug("buffer depth unavailable: %s", e)
            return
        self.metrics.buffer_depth.set(depth)
        for reason, n in dropped.items():
            self.metrics.buffer_dropped.labels(reason=reason).inc(n)
            if reason == "drop_oldest":
                logger.warning("buffer full: %d oldest examples dropped (buffer_trim=drop_oldest)", n)
        if self._instance is not None and instance != self._instance:
            durable = self._durability is not None and self._durability.durable
            if durable:
                logger.warning("the feedback buffer's store restarted (id %s -> %s); it is durable (%s)",
                               self._instance, instance, self._durability.mode)
            else:  # what the old store held: its last depth, plus appends since, less those already in the new one
                lost = max(0, self._last_depth + self._unsampled - depth)
                self.metrics.buffer_lost.inc(lost)
                logger.error("the feedback buffer's store restarted without persistence (id %s -> %s): up to %d "
                             "buffered examples lost, counted in loraloop_buffer_lost_total", self._instance,
                             instance, lost)
            self._durability = None  # its persistence may have changed: ask again before the next append
        self._instance, self._last_depth, self._unsampled = instance, depth, 0

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
