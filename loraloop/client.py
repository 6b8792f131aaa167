"""Send requests and wait for their predictions: the Python side of ``loraloop predict`` and the gateway.

A :class:`RequestClient` produces each request to the requests topic and reads the predictions
and dead-letter topics from the moment it started (every partition, no consumer group:
:func:`loraloop.transport.tail.tail`). A prediction is matched to its request by
``request_id``; a dead letter by where the request landed (its partition and offset in the
requests topic, which the worker copies into the letter), so a request refused by the worker
(``oversize_text``, ``empty_text``...) returns that reason to the caller instead of timing out,
redacted dead letters included.

The workers stay the only place where the model runs; the client only waits. Predictions are
at least once: a repeated prediction for a request already answered is ignored.

Example:
    >>> from loraloop.settings import Settings
    >>> from loraloop.transport.memory import MemoryTransport
    >>> transport = MemoryTransport()
    >>> with RequestClient(Settings(), transport=transport) as client:
    ...     pending = client.submit("hello", request_id="r1")
    ...     # a worker would answer; here one is written by hand
    ...     _ = transport.producer().send("loraloop.predictions", Prediction(
    ...         request_id="r1", label="greeting", score=0.9, top_k=[], adapter_version="v000001-x",
    ...         latency_ms=1.0).to_bytes())
    ...     answer = pending.result(timeout=5)
    >>> answer.status, answer.label
    ('answered', 'greeting')
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

from pydantic import ValidationError

from loraloop.metrics import Metrics
from loraloop.redact import mask_url
from loraloop.runtime import RateLimitedLog, close_quietly
from loraloop.schemas import MAX_RECORD_BYTES, DeadLetter, Prediction, Request
from loraloop.settings import Settings
from loraloop.transport import Producer, SendResult, Transport, TransportError, make_transport
from loraloop.transport.tail import TailReader, tail

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_IN_FLIGHT = 10_000
_POLL_MS = 200
_ACK_TIMEOUT_S = 60.0
_ORPHANS = 10_000  # dead letters seen before their request's offset was known, kept to be matched
_PING_S = 5.0

Status = Literal["answered", "dead_letter", "timeout", "refused"]


class PredictTimeout(TimeoutError):
    """No prediction and no dead letter for a request in time (no worker running, or one far behind)."""

    def __init__(self, request_id: str, timeout: float, topic: str) -> None:
        super().__init__(f"no prediction for request {request_id} within {timeout:g} s: is a worker consuming "
                         f"{topic}, with an active adapter? (loraloop status)")
        self.request_id = request_id


class Overloaded(RuntimeError):
    """More requests in flight than ``max_in_flight``: refused before sending."""


@dataclass(frozen=True)
class Answer:
    """What became of one request: a prediction, a dead letter's reason, a timeout or a refusal."""

    request_id: str
    status: Status
    prediction: Prediction | None = None
    reason: str = ""
    detail: str = ""

    @property
    def label(self) -> str | None:
        return self.prediction.label if self.prediction else None

    @property
    def adapter_version(self) -> str | None:
        return self.prediction.adapter_version if self.prediction else None

    def as_dict(self) -> dict:
        out: dict = {"request_id": self.request_id, "status": self.status}
        if self.prediction is not None:
            p = self.prediction
            out.update(label=p.label, score=p.score, top_k=[t.model_dump() for t in p.top_k],
                       adapter_version=p.adapter_version, latency_ms=p.latency_ms, truncated=p.truncated)
        if self.reason:
            out.update(reason=self.reason, detail=self.detail)
        return out


class Pending:
    """A request sent and not yet answered; :meth:`result` waits for it."""

    def __init__(self, client: RequestClient, request_id: str, future: concurrent.futures.Future) -> None:
        self._client, self.request_id, self.future = client, request_id, future

    def result(self, timeout: float = DEFAULT_TIMEOUT_S) -> Answer:
        """The answer; after ``timeout`` seconds an Answer with status ``timeout`` (the request is forgotten)."""
        try:
            return self.future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            return self.expire(timeout)

    def expire(self, waited: float) -> Answer:
        """Stop waiting: the answer if it came in the meantime, else one with status ``timeout``."""
        self._client._expire(self.request_id, waited)
        return self.future.result(timeout=0)


class RequestClient:
    """Requests in, predictions (or dead-letter reasons) out, over any transport.

    Args:
        settings: topics (``requests_topic``, ``predictions_topic``, ``dead_letter_topic``), the
            transport settings and ``max_text_bytes``.
        transport: the transport to use (default: ``make_transport(settings)``; the in-memory one
            is per process, so client and worker must share it).
        metrics: counts outcomes (``loraloop_predict_requests_total``) and requests in flight.
        max_in_flight: most requests waited for at once; more raise :class:`Overloaded`.

    Clients start lazily (at the first request, or :meth:`start`) and support ``with``.
    """

    def __init__(self, settings: Settings, *, transport: Transport | None = None, metrics: Metrics | None = None,
                 max_in_flight: int = DEFAULT_MAX_IN_FLIGHT) -> None:
        self.settings = settings
        self.transport = transport
        self.metrics = metrics
        self.max_in_flight = max_in_flight
        self._lock = threading.Lock()
        self._started = False
        self._closed = threading.Event()
        self._pending: dict[str, concurrent.futures.Future] = {}
        self._by_offset: dict[tuple[int, int], str] = {}  # (partition, offset) in the requests topic -> id
        self._offset_of: dict[str, tuple[int, int]] = {}
        self._orphans: OrderedDict[tuple[int, int], DeadLetter] = OrderedDict()
        self._acks: queue.Queue[tuple[str, SendResult] | None] = queue.Queue()
        self._producer: Producer | None = None
        self._reader: TailReader | None = None
        self._threads: list[threading.Thread] = []
        self._errors = RateLimitedLog(logger)

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> RequestClient:
        """Connect: read the ends of the predictions and dead-letter topics, then accept requests.

        Raises:
            TransportError: no broker answers.
        """
        with self._lock:
            if self._started:
                return self
            if self._closed.is_set():
                raise TransportError("the request client is closed")
            s = self.settings
            transport = self.transport if self.transport is not None else make_transport(s)
            if not transport.ping(timeout=_PING_S):
                where = mask_url(s.kafka_bootstrap) if s.transport == "kafka" else s.transport
                raise TransportError(f"no broker answers at {where} (transport {s.transport})")
            self.transport = transport
            self._reader = tail(transport, [s.predictions_topic, s.dead_letter_topic])
            self._producer = transport.producer()
            self._threads = [threading.Thread(target=self._read, name="request-client-reader", daemon=True),
                             threading.Thread(target=self._ack, name="request-client-acks", daemon=True)]
            for thread in self._threads:
                thread.start()
            self._started = True
        return self

    def close(self) -> None:
        """Stop reading; requests still waited for end with status ``timeout`` (detail: closed)."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._acks.put(None)
        for thread in self._threads:
            thread.join(timeout=5)
        with self._lock:
            pending, self._pending = self._pending, {}
            self._by_offset.clear()
            self._offset_of.clear()
        for request_id, future in pending.items():
            future.set_result(Answer(request_id, "timeout", reason="closed", detail="the client was closed"))
        close_quietly((self._reader, self._producer), logger)
        self._gauge()

    def __enter__(self) -> RequestClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- requests --------------------------------------------------------------------------
    def submit(self, text: str, *, request_id: str | None = None, tenant: str | None = None) -> Pending:
        """Send one request now; :meth:`Pending.result` waits for its answer.

        A request too large for any broker record is not sent: its answer is at once ``refused``
        with reason ``oversize_record``.

        Raises:
            Overloaded: ``max_in_flight`` requests are already waited for.
            TransportError: the broker refused the record or cannot be reached.
        """
        self.start()
        request = Request(id=request_id or uuid.uuid4().hex, text=text, tenant=tenant)
        future: concurrent.futures.Future = concurrent.futures.Future()
        value = request.to_bytes()
        limit = MAX_RECORD_BYTES  # the worker reads records this large; brokers refuse larger ones anyway
        if len(value) > limit:
            self._count("refused")
            future.set_result(Answer(request.id, "refused", reason="oversize_record",
                                     detail=f"request is {len(value)} bytes, over the {limit}-byte record limit; "
                                            f"not sent (texts over max_text_bytes={self.settings.max_text_bytes} "
                                            f"are refused by the worker)"))
            return Pending(self, request.id, future)
        with self._lock:
            if len(self._pending) >= self.max_in_flight:
                raise Overloaded(f"{len(self._pending)} requests in flight (max_in_flight {self.max_in_flight})")
            if request.id in self._pending:
                raise ValueError(f"request id {request.id!r} is already waited for")
            self._pending[request.id] = future
        self._gauge()
        try:
            sent = self._producer.send(self.settings.requests_topic, value, key=request.id.encode())
        except Exception:
            self._forget(request.id)
            raise
        self._acks.put((request.id, sent))
        return Pending(self, request.id, future)

    def predict(self, text: str, timeout: float = DEFAULT_TIMEOUT_S, *, request_id: str | None = None,
                tenant: str | None = None) -> Answer:
        """The answer to one request (a prediction, or the reason it was dead-lettered or refused).

        Raises:
            PredictTimeout: neither came within ``timeout`` seconds (its message names the request id).
            Overloaded, TransportError: as :meth:`submit`.
        """
        answer = self.submit(text, request_id=request_id, tenant=tenant).result(timeout)
        if answer.status == "timeout":
            raise PredictTimeout(answer.request_id, timeout, self.settings.requests_topic)
        return answer

    def predict_many(self, texts: list[str], timeout: float = DEFAULT_TIMEOUT_S, *,
                     tenant: str | None = None) -> list[Answer]:
        """One answer per text, in order, all within one ``timeout``; late ones have status ``timeout``."""
        pending = [self.submit(t, tenant=tenant) for t in texts]
        deadline = time.monotonic() + timeout
        return [p.result(max(0.0, deadline - time.monotonic())) for p in pending]

    # --- matching ----------------------------------------------------------------------------
    def _resolve(self, request_id: str, answer: Answer) -> bool:
        with self._lock:
            future = self._pending.pop(request_id, None)
            where = self._offset_of.pop(request_id, None)
            if where is not None:
                self._by_offset.pop(where, None)
        if future is None:  # answered already (a repeated prediction) or given up
            return False
        self._count(answer.status)
        future.set_result(answer)
        self._gauge()
        return True

    def _expire(self, request_id: str, timeout: float) -> None:
        self._resolve(request_id, Answer(request_id, "timeout", reason="timeout",
                                         detail=f"no prediction within {timeout:g} s (is a worker running?)"))

    def _forget(self, request_id: str) -> None:
        with self._lock:
            self._pending.pop(request_id, None)
        self._gauge()

    def _ack(self) -> None:
        """Learn where each request landed, in send order, to match dead letters by partition and offset."""
        while True:
            item = self._acks.get()
            if item is None:
                return
            request_id, sent = item
            try:
                partition, offset = sent.get(timeout=_ACK_TIMEOUT_S)
            except TransportError as e:
                self._resolve(request_id, Answer(request_id, "refused", reason="not_delivered", detail=str(e)))
                continue
            with self._lock:
                if request_id not in self._pending:
                    continue
                letter = self._orphans.pop((partition, offset), None)
                if letter is None:
                    self._by_offset[(partition, offset)] = request_id
                    self._offset_of[request_id] = (partition, offset)
            if letter is not None:
                self._resolve(request_id, _letter_answer(request_id, letter))

    def _read(self) -> None:
        s = self.settings
        while not self._closed.is_set():
            try:
                records = self._reader.poll(timeout_ms=_POLL_MS, max_records=500)
            except TransportError as e:
                self._errors(logging.WARNING, "reading predictions failed (retrying): %s", e)
                self._closed.wait(1.0)
                continue
            for record in records:
                if record.topic == s.predictions_topic:
                    self._on_prediction(record.value)
                else:
                    self._on_letter(record.value)

    def _on_prediction(self, value: bytes) -> None:
        try:
            prediction = Prediction.model_validate_json(value)
        except (ValidationError, ValueError):
            return  # not ours to judge: whatever else writes to the topic
        if prediction.request_id in self._pending:
            self._resolve(prediction.request_id, Answer(prediction.request_id, "answered", prediction))

    def _on_letter(self, value: bytes) -> None:
        try:
            letter = DeadLetter.model_validate_json(value)
        except (ValidationError, ValueError):
            return
        if letter.source_topic != self.settings.requests_topic:
            return
        where = (letter.partition, letter.offset)
        with self._lock:
            request_id = self._by_offset.get(where)
            if request_id is None:
                if self._pending:  # possibly one of ours whose acknowledgement is still on its way
                    self._orphans[where] = letter
                    while len(self._orphans) > _ORPHANS:
                        self._orphans.popitem(last=False)
                return
        self._resolve(request_id, _letter_answer(request_id, letter))

    # --- metrics -----------------------------------------------------------------------------
    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.predict_requests.labels(outcome=outcome).inc()

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.predict_in_flight.set(len(self._pending))

    @property
    def in_flight(self) -> int:
        return len(self._pending)


def _letter_answer(request_id: str, letter: DeadLetter) -> Answer:
    return Answer(request_id, "dead_letter", reason=letter.reason, detail=letter.detail)
