"""The HTTP feedback endpoint under hostile clients: tokens, body limits, slow clients, rate and connection caps."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from prometheus_client import CollectorRegistry

from feedback.http import MAX_BODY_BYTES, FeedbackServer, serve_feedback
from loraloop.metrics import Metrics
from loraloop.schemas import FeedbackEvent
from loraloop.settings import Settings
from loraloop.transport import TopicPartition
from loraloop.transport.memory import MemoryBroker, MemoryTransport

TOKEN = "s3cret-token-for-tests"
EVENT = b'{"event_id": "e1", "request_id": "r1", "kind": "thumbs_up"}'


@pytest.fixture()
def start() -> Iterator[Callable[..., FeedbackServer]]:
    servers: list[FeedbackServer] = []

    def make(host: str = "127.0.0.1", **overrides: object) -> FeedbackServer:
        settings = Settings(**{"feedback_topic": f"fb-{uuid.uuid4().hex[:8]}", "api_token": TOKEN, **overrides})
        transport = MemoryTransport(MemoryBroker(partitions=1))
        server = serve_feedback(settings, port=0, transport=transport, host=host, metrics=Metrics(CollectorRegistry()))
        server.test_broker = transport.broker
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


def _produced(server: FeedbackServer) -> list[FeedbackEvent]:
    broker = server.test_broker
    return [FeedbackEvent.model_validate_json(r.value) for r in broker.read(TopicPartition(server.topic, 0), 0, 10**6)]


def _post(port: int, body: bytes = EVENT, token: str | None = TOKEN, source: str = "127.0.0.1",
          timeout: float = 5.0) -> tuple[int, dict, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout, source_address=(source, 0))
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request("POST", "/feedback", body=body, headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read()), dict(response.getheaders())
    finally:
        conn.close()


def _raw(port: int, data: bytes, timeout: float = 5.0) -> tuple[int, dict]:
    """Send raw bytes, read the reply until the server closes; (status, JSON body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 "), reply[:200]
    return int(head.split()[1]), json.loads(body)


def _head(length: str | None, extra: str = "", token: str = TOKEN) -> bytes:
    lines = ["POST /feedback HTTP/1.1", "Host: x", f"Authorization: Bearer {token}"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + extra + "\r\n\r\n").encode()


def test_post_needs_the_token(start) -> None:
    server = start()
    assert _post(server.port, token=None)[:2] == (401, {"reason": "unauthorized", "detail": (
        "POST /feedback needs 'Authorization: Bearer <api_token>'")})
    status, body, headers = _post(server.port, token="wrong")
    assert (status, body["detail"], headers["WWW-Authenticate"]) == (401, "the bearer token is wrong",
                                                                      'Bearer realm="loraloop"')
    assert _post(server.port)[:2] == (202, {"event_ids": ["e1"]})
    assert [e.event_id for e in _produced(server)] == ["e1"]  # only the authorized one
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request("GET", "/healthz")  # probes need no token
    assert conn.getresponse().status == 200
    registry = server.metrics.registry
    assert registry.get_sample_value("loraloop_feedback_http_requests_total", {"code": "401"}) == 2
    assert registry.get_sample_value("loraloop_feedback_http_requests_total", {"code": "202"}) == 1


def test_no_token_is_refused_beyond_loopback_and_allowed_on_it(start) -> None:
    with pytest.raises(ValueError, match="'0.0.0.0', beyond loopback, without a token"):
        start(host="0.0.0.0", api_token="")
    assert start(host="0.0.0.0").port > 0  # with a token it binds everywhere
    open_server = start(api_token="")
    assert _post(open_server.port, token=None)[0] == 202
    assert Settings().feedback_http_host == "127.0.0.1"


@pytest.mark.parametrize(("length", "extra", "status", "reason"), [
    ("-1", "", 413, "too_large"),
    (str(MAX_BODY_BYTES + 1), "", 413, "too_large"),
    ("99999999999999999999", "", 400, "bad_content_length"),  # 20 digits: not a size worth parsing
    ("abc", "", 400, "bad_content_length"),
    ("+5", "", 400, "bad_content_length"),
    ("1_0", "", 400, "bad_content_length"),
    (None, "", 411, "length_required"),
    (None, "\r\nTransfer-Encoding: chunked", 411, "length_required"),
    ("5", "\r\nContent-Length: 6", 400, "bad_content_length"),
])
def test_body_limit_cannot_be_bypassed(start, length: str | None, extra: str, status: int, reason: str) -> None:
    server = start()
    t0 = time.monotonic()
    got_status, body = _raw(server.port, _head(length, extra) + b"x" * 100)  # a body follows; never read
    assert (got_status, body["reason"]) == (status, reason) and body["detail"]
    assert time.monotonic() - t0 < 2.0
    assert _produced(server) == []


def test_oversize_body_is_refused_without_reading_it(start) -> None:
    server = start()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(_head(str(2 * MAX_BODY_BYTES)))  # headers only: the 2 MiB never come
        reply = s.recv(65536)
    assert reply.startswith(b"HTTP/1.1 413 ") and b'"too_large"' in reply


def test_bad_requests_get_a_json_reply(start) -> None:
    server = start()
    assert _raw(server.port, b"GARBAGE\r\n\r\n")[1]["reason"] == "bad_request"
    assert _raw(server.port, b"GET /nowhere HTTP/1.0\r\nHost: x\r\n\r\n")[0] == 404  # 1.0: closes after
    assert _raw(server.port, b"GET /feedback HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")[0] == 405
    assert _raw(server.port, b"POST /feedback HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n")[0] == 431
    status, body, _ = _post(server.port, body=b"[" * 50_000)
    assert (status, body["reason"]) == (400, "malformed_json")
    status, body, _ = _post(server.port, body='{"request_id": "r\ud800", "kind": "thumbs_up"}'.encode(
        "utf-8", "surrogatepass"))
    assert status == 400


def test_keep_alive_serves_several_requests_on_one_connection(start) -> None:
    server = start()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    for i in range(3):
        conn.request("POST", "/feedback", body=json.dumps({"event_id": f"k{i}", "request_id": "r", "kind":
                                                           "thumbs_up"}),
                     headers={"Authorization": f"Bearer {TOKEN}"})
        assert conn.getresponse().read() == json.dumps({"event_ids": [f"k{i}"]}).encode()
    conn.close()


class _SlowClients:
    """``n`` connections that send a request head one byte every ``every_s`` seconds (some then trickle a body)."""

    def __init__(self, port: int, n: int, every_s: float = 0.2) -> None:
        self.sockets = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(n)]
        self.every_s, self.stop = every_s, threading.Event()
        self.closed_by_server = 0
        self.thread = threading.Thread(target=self._trickle, daemon=True)
        self.thread.start()

    def _trickle(self) -> None:
        heads = [_head("100") if i % 2 else b"POST /feedback HTTP/1.1\r\nHost: slow\r\nX-Pad: " + b"a" * 1000
                 for i in range(len(self.sockets))]
        position = 0
        while not self.stop.wait(self.every_s):
            for s, head in zip(self.sockets, heads, strict=True):
                data = head[position:position + 1] if position < len(head) else b"x"
                try:
                    s.sendall(data)
                except OSError:
                    self.closed_by_server += 1
            position += 1

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        for s in self.sockets:
            s.close()


def test_a_hundred_slow_clients_do_not_delay_a_fast_one(start) -> None:
    server = start(feedback_http_timeout_s=30.0)
    slow = _SlowClients(server.port, 100)
    try:
        deadline = time.monotonic() + 5
        while server.connections < 100:
            assert time.monotonic() < deadline, f"only {server.connections} slow connections open"
            time.sleep(0.01)
        time.sleep(0.5)  # they are mid-request now
        for i in range(5):
            t0 = time.monotonic()
            status, body, _ = _post(server.port, body=json.dumps({"event_id": f"fast{i}", "request_id": "r1",
                                                                   "kind": "thumbs_up"}).encode(), timeout=2)
            elapsed = time.monotonic() - t0
            assert (status, body) == (202, {"event_ids": [f"fast{i}"]})
            assert elapsed < 1.0, f"the fast client waited {elapsed:.2f} s behind 100 slow ones"
        assert server.connections >= 100  # the slow ones are still being waited for, none served
    finally:
        slow.close()


def test_slow_clients_are_timed_out(start) -> None:
    server = start(feedback_http_timeout_s=0.5)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"POST /feedback HTTP/1.1\r\nHost: x\r\n")  # headers never finish
        t0 = time.monotonic()
        reply = s.recv(65536)
        assert reply.startswith(b"HTTP/1.1 408 ") and b'"timeout"' in reply
        assert time.monotonic() - t0 < 1.5
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(_head("100") + b"only part of the body")
        reply = s.recv(65536)
        assert reply.startswith(b"HTTP/1.1 408 ") and b"body of 100 bytes" in reply
    deadline = time.monotonic() + 2
    while server.connections:
        assert time.monotonic() < deadline, "timed-out connections stay open"
        time.sleep(0.01)


def test_connection_cap_answers_503_at_once(start) -> None:
    server = start(feedback_http_max_connections=5)
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(5)]
    try:
        deadline = time.monotonic() + 5
        while server.connections < 5:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        t0 = time.monotonic()
        status, body = _raw(server.port, _head("2") + b"{}")
        assert (status, body["reason"]) == (503, "too_many_connections") and time.monotonic() - t0 < 1.0
    finally:
        for s in idle:
            s.close()
    deadline = time.monotonic() + 2
    while _post(server.port)[0] != 202:  # the cap frees up once they leave
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_rate_limit_per_client(start) -> None:
    server = start(feedback_http_rate_per_s=1.0, feedback_http_burst=3)
    statuses = [_post(server.port)[0] for _ in range(3)]
    status, body, headers = _post(server.port)
    assert statuses == [202] * 3 and (status, body["reason"]) == (429, "rate_limited")
    assert "127.0.0.1" in body["detail"] and int(headers["Retry-After"]) >= 1
    assert _post(server.port, token=None)[0] == 429  # limited before the token is checked: no free guessing
    assert _post(server.port, source="127.0.0.2")[0] == 202  # another client has its own bucket
    time.sleep(1.1)
    assert _post(server.port)[0] == 202  # refilled


def test_expect_continue_is_answered_before_the_body(start) -> None:
    server = start()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(_head(str(len(EVENT)), "\r\nExpect: 100-continue\r\nConnection: close"))
        assert s.recv(1024) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(EVENT)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 202 ") and reply.endswith(b'{"event_ids": ["e1"]}')
