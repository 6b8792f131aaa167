"""HTTP feedback endpoint: ``POST /feedback`` produces to the feedback topic; ``GET /healthz``.

The endpoint only validates and produces: the ingester consuming the topic stays the
single path into the buffer. A body is one event object or a list of them
(``event_id`` optional: one is assigned when absent, and then a retried POST is not
deduplicated). Replies: 202 ``{"event_ids": [...]}``; 400 ``{"reason", "detail", "index"}``
for invalid input (nothing of the body is produced); 503 when the broker did not
acknowledge.

Example:
    curl -X POST localhost:8081/feedback -d '{"request_id": "r1", "kind": "label", "label": "billing"}'
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from feedback.join import label_problem, parse_allowed
from loraloop.schemas import FeedbackEvent, InvalidMessage, decode_feedback
from loraloop.settings import Settings
from loraloop.transport import Producer, Transport, TransportError, make_transport

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
MAX_EVENTS = 1000
DELIVERY_TIMEOUT_S = 10.0


def parse_body(body: bytes, allowed: frozenset[str] | None) -> list[FeedbackEvent]:
    """The events of a POST body, or InvalidMessage (its ``index`` attribute names the bad event).

    Example:
        >>> [e.kind for e in parse_body(b'[{"request_id": "r1", "kind": "thumbs_up"}]', None)]
        ['thumbs_up']
    """
    try:
        items = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidMessage("malformed_json", str(e)) from e
    items = items if isinstance(items, list) else [items]
    if len(items) > MAX_EVENTS:
        raise InvalidMessage("wrong_type", f"{len(items)} events in one request, limit {MAX_EVENTS}")
    events = []
    for index, item in enumerate(items):
        try:
            if isinstance(item, dict) and "event_id" not in item:
                item = {**item, "event_id": uuid.uuid4().hex}
            event = decode_feedback(json.dumps(item))
            problem = label_problem(event.label, allowed) if event.kind == "label" else None
            if problem is not None:
                raise InvalidMessage("label_not_allowed", problem)
        except InvalidMessage as e:
            e.index = index
            raise
        events.append(event)
    return events


class _Handler(BaseHTTPRequestHandler):
    server: FeedbackServer

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path.split("?")[0] == "/healthz":
            self._reply(200, {"status": "ok"})
        else:
            self._reply(404, {"reason": "not_found", "detail": self.path})

    def do_POST(self) -> None:  # noqa: N802
        if self.path.split("?")[0] != "/feedback":
            return self._reply(404, {"reason": "not_found", "detail": self.path})
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            return self._reply(413, {"reason": "too_large", "detail": f"{length} bytes, limit {MAX_BODY_BYTES}"})
        try:
            events = parse_body(self.rfile.read(length), self.server.allowed)
        except InvalidMessage as e:
            return self._reply(400, {"reason": e.reason, "detail": e.detail, "index": getattr(e, "index", None)})
        try:
            self.server.produce(events)
        except TransportError as e:
            logger.warning("feedback not acknowledged by the broker: %s", e)
            return self._reply(503, {"reason": "broker_unavailable", "detail": str(e)})
        self._reply(202, {"event_ids": [e.event_id for e in events]})

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, fmt: str, *args: object) -> None:
        logger.debug("%s " + fmt, self.address_string(), *args)


class FeedbackServer(ThreadingHTTPServer):
    """The endpoint; ``port`` is the bound one (pass 0 for any free port)."""

    daemon_threads = True

    def __init__(self, settings: Settings, port: int, transport: Transport | None = None,
                 host: str = "0.0.0.0") -> None:
        super().__init__((host, port), _Handler)
        self.topic, self.allowed = settings.feedback_topic, parse_allowed(settings.allowed_labels)
        self._producer: Producer = (transport or make_transport(settings)).producer()
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def produce(self, events: list[FeedbackEvent]) -> None:
        """Produce and wait for the broker's acknowledgement of every event."""
        with self._lock:  # one flush at a time: a reply means its events are acknowledged
            futures = [self._producer.send(self.topic, e.to_bytes(), key=e.request_id.encode()) for e in events]
            self._producer.flush(timeout=DELIVERY_TIMEOUT_S)
        for future in futures:
            future.get(timeout=DELIVERY_TIMEOUT_S)

    def start(self) -> FeedbackServer:
        threading.Thread(target=self.serve_forever, name=f"feedback-http-{self.port}", daemon=True).start()
        logger.info("feedback endpoint: POST http://%s:%d/feedback", self.server_address[0], self.port)
        return self

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self._producer.close()


def serve_feedback(settings: Settings, port: int | None = None, transport: Transport | None = None,
                   host: str = "0.0.0.0") -> FeedbackServer:
    """Start the endpoint on a daemon thread (port: ``settings.feedback_http_port`` when None)."""
    return FeedbackServer(settings, settings.feedback_http_port if port is None else port, transport, host).start()
