"""HTTP feedback endpoint: ``POST /feedback`` produces to the feedback topic; ``GET /healthz``.

The endpoint only validates and produces: the ingester consuming the topic stays the
single path into the buffer. A body is one event object or a list of them
(``event_id`` optional: one is assigned when absent, and then a retried POST is not
deduplicated). Replies (JSON): 202 ``{"event_ids": [...]}``; 400 ``{"reason", "detail", "index"}``
for invalid input (nothing of the body is produced); 503 when the broker did not
acknowledge.

It is a small asyncio HTTP/1.1 server rather than a thread per connection, so that slow or
idle clients cost a coroutine, not a thread, and every limit is enforced before anything is
read unbounded:

- binds ``feedback_http_host`` (127.0.0.1 by default); beyond loopback it refuses to start
  without ``api_token``, and whenever a token is set every POST needs
  ``Authorization: Bearer <token>`` (compared in constant time), else 401;
- a per-client-address token bucket (``feedback_http_rate_per_s``, ``feedback_http_burst``): 429;
- at most ``feedback_http_max_connections`` open connections: more are answered 503 at once;
- headers (16 KiB at most, else 431) and body must arrive within ``feedback_http_timeout_s``,
  else 408; an idle keep-alive connection closes after it;
- the body is read only with a valid ``Content-Length`` of at most 1 MiB: missing 411,
  not a number 400, negative or larger 413, ``Transfer-Encoding`` 411.

h11 and httptools (uvicorn's parsers) answer a negative ``Content-Length`` with a bare 400
before an application runs; the parsing here is strict in the same way but gives every
refusal its JSON reason.

Example:
    curl -X POST localhost:8081/feedback -H "Authorization: Bearer $LORALOOP_API_TOKEN" \\
         -d '{"request_id": "r1", "kind": "label", "label": "billing"}'
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import re
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from feedback.join import label_problem, parse_allowed
from loraloop.metrics import Metrics
from loraloop.schemas import FeedbackEvent, InvalidMessage, decode_feedback
from loraloop.settings import Settings
from loraloop.transport import Producer, Transport, TransportError, make_transport

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
MAX_HEADER_BYTES = 16 << 10
MAX_EVENTS = 1000
DELIVERY_TIMEOUT_S = 10.0
WORKER_THREADS = 4  # parse and produce off the event loop
MAX_RATE_CLIENTS = 10_000  # client addresses remembered by the rate limiter
_LENGTH = re.compile(r"-?[0-9]{1,19}")

_STATUS = {200: "OK", 202: "Accepted", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
           405: "Method Not Allowed", 408: "Request Timeout", 411: "Length Required", 413: "Content Too Large",
           429: "Too Many Requests", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
           503: "Service Unavailable"}


def parse_body(body: bytes, allowed: frozenset[str] | None) -> list[FeedbackEvent]:
    """The events of a POST body, or InvalidMessage (its ``index`` attribute names the bad event).

    Example:
        >>> [e.kind for e in parse_body(b'[{"request_id": "r1", "kind": "thumbs_up"}]', None)]
        ['thumbs_up']
    """
    try:
        items = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise InvalidMessage("malformed_json", str(e)[:200]) from e
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
        except Exception as e:  # noqa: BLE001 - nothing in a body may fail the request without a reply
            error = InvalidMessage("wrong_type", f"event {index} could not be read: {type(e).__name__}")
            error.index = index
            raise error from e
        events.append(event)
    return events


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable only from this machine.

    Example:
        >>> [is_loopback(h) for h in ("127.0.0.1", "::1", "localhost", "0.0.0.0", "10.0.0.5")]
        [True, True, True, False, False]
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Reply(Exception):  # noqa: N818 - control flow: answer and (usually) close
    def __init__(self, status: int, reason: str, detail: str, close: bool = True, headers: dict | None = None):
        super().__init__(f"{status} {reason}: {detail}")
        self.status, self.body, self.close, self.headers = status, {"reason": reason, "detail": detail}, close, headers


class _Buckets:
    """Token bucket per client address."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self._state: dict[str, tuple[float, float]] = {}

    def take(self, client: str, now: float) -> float:
        """0 when the client may go on, else the seconds until its next token."""
        tokens, at = self._state.get(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        if tokens < 1.0:
            self._state[client] = (tokens, now)
            return (1.0 - tokens) / self.rate
        self._state[client] = (tokens - 1.0, now)
        if len(self._state) > MAX_RATE_CLIENTS:  # forget clients whose bucket is full again
            full = [c for c, (t, a) in self._state.items() if t + (now - a) * self.rate >= self.burst]
            for c in full[: len(self._state) - MAX_RATE_CLIENTS // 2]:
                del self._state[c]
        return 0.0


class FeedbackServer:
    """The endpoint, served by an event loop on a daemon thread; ``port`` is the bound one (0: any free port).

    Args:
        settings: topic, labels, ``api_token`` and the ``feedback_http_*`` limits.
        port: port to bind.
        transport: where events are produced (built from settings when None).
        host: address to bind (``settings.feedback_http_host`` when None).
        metrics: counts replies by status (a private registry when None).

    Raises:
        ValueError: bound beyond loopback without ``api_token``.
    """

    def __init__(self, settings: Settings, port: int, transport: Transport | None = None,
                 host: str | None = None, metrics: Metrics | None = None) -> None:
        host = settings.feedback_http_host if host is None else host
        self._token = settings.api_token.get_secret_value().encode()
        if not self._token and not is_loopback(host):
            raise ValueError(f"the feedback endpoint would bind {host!r}, beyond loopback, without a token: set "
                             "api_token (LORALOOP_API_TOKEN) or bind 127.0.0.1")
        self.settings, self.host = settings, host
        self.topic, self.allowed = settings.feedback_topic, parse_allowed(settings.allowed_labels)
        self.metrics = metrics if metrics is not None else Metrics()
        self._timeout = settings.feedback_http_timeout_s
        self._max_connections = settings.feedback_http_max_connections
        self._buckets = _Buckets(settings.feedback_http_rate_per_s, settings.feedback_http_burst)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.create_server((host, port), family=family, backlog=512)
        self._producer: Producer = (transport or make_transport(settings)).producer()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="feedback-http")
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._connections = 0
        self._tasks: set[asyncio.Task] = set()

    @property
    def port(self) -> int:
        return self._socket.getsockname()[1]

    @property
    def connections(self) -> int:
        """Connections open now."""
        return self._connections

    def produce(self, events: list[FeedbackEvent]) -> None:
        """Produce and wait for the broker's acknowledgement of every event."""
        with self._lock:  # one flush at a time: a reply means its events are acknowledged
            futures = [self._producer.send(self.topic, e.to_bytes(), key=e.request_id.encode()) for e in events]
            self._producer.flush(timeout=DELIVERY_TIMEOUT_S)
        for future in futures:
            future.get(timeout=DELIVERY_TIMEOUT_S)

    def start(self) -> FeedbackServer:
        started = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(self._loop)

            async def begin() -> None:
                self._server = await asyncio.start_server(self._connection, sock=self._socket,
                                                          limit=MAX_HEADER_BYTES)
                started.set()

            self._loop.run_until_complete(begin())
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, name=f"feedback-http-{self.port}", daemon=True)
        self._thread.start()
        started.wait(10)
        auth = "bearer token required" if self._token else "no token (loopback only)"
        logger.info("feedback endpoint: POST http://%s:%d/feedback (%s)", self.host, self.port, auth)
        return self

    def close(self) -> None:
        """Stop accepting, drop open connections, close the producer."""
        if self._thread is not None and self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        else:
            self._socket.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._producer.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- one connection --------------------------------------------------------------------
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        self._connections += 1
        peer = writer.get_extra_info("peername")
        client = str(peer[0]) if peer else "?"
        try:
            if self._connections > self._max_connections:
                await self._send(writer, 503, {"reason": "too_many_connections",
                                               "detail": f"{self._connections - 1} connections open, limit "
                                                         f"{self._max_connections}"}, close=True)
                return
            keep = True
            while keep:
                keep = await self._request(reader, writer, client)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug here must cost one connection, never the server
            logger.exception("feedback endpoint: connection from %s failed", client)
        finally:
            self._connections -= 1
            self._tasks.discard(task)
            writer.close()

    async def _request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, client: str) -> bool:
        """Answer one request; returns whether the connection stays open for another."""
        deadline = time.monotonic() + self._timeout
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self._timeout)
        except asyncio.IncompleteReadError as e:
            if e.partial.strip():
                await self._send(writer, 400, {"reason": "bad_request", "detail": "connection closed mid-headers"},
                                 close=True)
            return False
        except asyncio.LimitOverrunError:
            await self._send(writer, 431, {"reason": "headers_too_large",
                                           "detail": f"headers over {MAX_HEADER_BYTES} bytes"}, close=True)
            return False
        except TimeoutError:
            await self._send(writer, 408, {"reason": "timeout", "detail": f"no complete request headers within "
                                           f"{self._timeout:g} s"}, close=True)
            return False
        keep_alive, headers = False, {}
        try:
            method, path, headers, keep_alive = _parse_head(head)
            status, body = await self._route(reader, writer, method, path, headers, client, deadline)
        except _Reply as reply:
            # A refusal before the body was read must close: the unread body would be taken for a request.
            close = reply.close or not keep_alive or _has_body(headers)
            await self._send(writer, reply.status, reply.body, close=close, headers=reply.headers)
            return not close
        await self._send(writer, status, body, close=not keep_alive)
        return keep_alive

    async def _route(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, method: str, path: str,
                     headers: dict[str, str], client: str, deadline: float) -> tuple[int, dict]:
        wait = self._buckets.take(client, time.monotonic())
        if wait:
            raise _Reply(429, "rate_limited", f"client {client} is over {self.settings.feedback_http_rate_per_s:g} "
                         f"requests/s (burst {self.settings.feedback_http_burst})", close=False,
                         headers={"Retry-After": str(max(1, round(wait)))})
        route = path.split("?")[0]
        if route == "/healthz" and method in ("GET", "HEAD"):
            return 200, {"status": "ok"}
        if route != "/feedback":
            raise _Reply(404, "not_found", path[:200], close=method not in ("GET", "HEAD"))
        if method != "POST":
            raise _Reply(405, "method_not_allowed", f"{method} {route}: only POST", close=True,
                         headers={"Allow": "POST"})
        self._authorize(headers)
        length = _content_length(headers)
        if headers.get("expect", "").lower() == "100-continue":  # curl asks before bodies over 1 KiB
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            raw = await asyncio.wait_for(reader.readexactly(length), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise _Reply(408, "timeout", f"body of {length} bytes not received within {self._timeout:g} s") from None
        loop = asyncio.get_running_loop()
        try:
            events = await loop.run_in_executor(self._pool, parse_body, raw, self.allowed)
        except InvalidMessage as e:
            return 400, {"reason": e.reason, "detail": e.detail, "index": getattr(e, "index", None)}
        try:
            await loop.run_in_executor(self._pool, self.produce, events)
        except TransportError as e:
            logger.warning("feedback not acknowledged by the broker: %s", e)
            return 503, {"reason": "broker_unavailable", "detail": str(e)}
        return 202, {"event_ids": [e.event_id for e in events]}

    def _authorize(self, headers: dict[str, str]) -> None:
        if not self._token:
            return
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._token):
            raise _Reply(401, "unauthorized", "POST /feedback needs 'Authorization: Bearer <api_token>'"
                         if not given else "the bearer token is wrong", close=True,
                         headers={"WWW-Authenticate": 'Bearer realm="loraloop"'})

    async def _send(self, writer: asyncio.StreamWriter, status: int, body: dict, close: bool,
                    headers: dict | None = None) -> None:
        self.metrics.feedback_http_requests.labels(code=str(status)).inc()
        data = json.dumps(body).encode()
        lines = [f"HTTP/1.1 {status} {_STATUS.get(status, 'Unknown')}", "Content-Type: application/json",
                 f"Content-Length: {len(data)}", f"Connection: {'close' if close else 'keep-alive'}",
                 *(f"{k}: {v}" for k, v in (headers or {}).items())]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data)
        try:
            await asyncio.wait_for(writer.drain(), self._timeout)
        except TimeoutError:
            writer.transport.abort()  # a client that does not read its reply


def _has_body(headers: dict[str, str]) -> bool:
    return "transfer-encoding" in headers or headers.get("content-length", "0") != "0"


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str], bool]:
    """Method, target, headers (lower-case names) and keep-alive of a request head; _Reply 400 when malformed."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _Reply(400, "bad_request", f"malformed request line {lines[0][:100]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise _Reply(400, "bad_request", f"malformed header line {line[:100]!r}")
        name, value = name.lower(), value.strip()
        if name in headers and name == "content-length" and headers[name] != value:
            raise _Reply(400, "bad_content_length", f"two different Content-Length headers: {headers[name]!r}, "
                         f"{value!r}")
        headers[name] = value if name not in headers or name == "content-length" else f"{headers[name]}, {value}"
    connection = headers.get("connection", "").lower()
    keep = "close" not in connection if parts[2] == "HTTP/1.1" else "keep-alive" in connection
    return parts[0], parts[1], headers, keep


def _content_length(headers: dict[str, str]) -> int:
    """The body length to read, refused (without reading anything) unless 0..MAX_BODY_BYTES."""
    if "transfer-encoding" in headers:
        raise _Reply(411, "length_required", f"Transfer-Encoding {headers['transfer-encoding'][:50]!r} is not "
                     "accepted: send the body with a Content-Length")
    value = headers.get("content-length")
    if value is None:
        raise _Reply(411, "length_required", "POST /feedback needs a Content-Length header")
    if not _LENGTH.fullmatch(value):  # ASCII digits only: int() would also take "+5", "1_0" and "²"
        raise _Reply(400, "bad_content_length", f"Content-Length {value[:50]!r} is not a number")
    length = int(value)
    if length < 0 or length > MAX_BODY_BYTES:
        raise _Reply(413, "too_large", f"Content-Length {value[:50]} is not a body size in 0..{MAX_BODY_BYTES} bytes")
    return length


def serve_feedback(settings: Settings, port: int | None = None, transport: Transport | None = None,
                   host: str | None = None, metrics: Metrics | None = None) -> FeedbackServer:
    """Start the endpoint on a daemon thread (port: ``settings.feedback_http_port`` when None;
    host: ``settings.feedback_http_host`` when None)."""
    port = settings.feedback_http_port if port is None else port
    return FeedbackServer(settings, port, transport, host, metrics).start()
