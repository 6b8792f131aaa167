"""The HTTP gateway on the in-memory transport: predict, feedback, read-only status, OpenAPI, 200 concurrent calls."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from prometheus_client import CollectorRegistry
from pydantic import SecretStr
from starlette.testclient import TestClient

from gateway.cli import build_gateway
from loraloop.metrics import Metrics
from loraloop.schemas import FeedbackEvent
from loraloop.transport import TopicPartition
from tests.infra import free_port
from tests.test_client import Loop


@pytest.fixture()
def loop(tmp_path: Path, base_dir: Path) -> Iterator[Loop]:
    stack = Loop(tmp_path, base_dir)
    yield stack
    stack.stop()


def _gateway(loop: Loop, **settings: object):
    s = loop.settings.model_copy(update=settings) if settings else loop.settings
    return build_gateway(s, metrics=Metrics(CollectorRegistry()), transport=loop.transport, default_timeout_s=20)


def _topic(loop: Loop, name: str) -> list[bytes]:
    broker = loop.transport.broker
    return [r.value for p in range(broker.partitions(name)) for r in broker.read(TopicPartition(name, p), 0, 10**6)]


def test_predict_one_and_many_through_the_workers(loop: Loop) -> None:
    loop.start_worker()
    gateway = _gateway(loop)
    with TestClient(gateway.app()) as http:
        one = http.post("/v1/predict", json={"text": "I lost my card"})
        assert one.status_code == 200, one.text
        body = one.json()
        assert (body["status"], body["label"], body["adapter_version"]) == ("answered", "lost_card", loop.version)
        assert body["request_id"] and body["top_k"][0]["label"] == "lost_card"
        many = http.post("/v1/predict", json={"texts": ["a", "b", "x" * 600], "timeout": 20})
        assert many.status_code == 200
        items = many.json()["predictions"]
        assert [i["status"] for i in items] == ["answered", "answered", "dead_letter"]
        assert items[2]["reason"] == "oversize_text"
        refused = http.post("/v1/predict", json={"text": "y" * 600})
        assert refused.status_code == 422 and refused.json()["reason"] == "oversize_text"
    samples = gateway.metrics.registry.get_sample_value
    assert samples("loraloop_gateway_http_requests_total", {"route": "/v1/predict", "code": "200"}) == 2
    assert samples("loraloop_gateway_http_requests_total", {"route": "/v1/predict", "code": "422"}) == 1


def test_no_worker_answers_504_with_the_request_id(loop: Loop) -> None:
    with TestClient(_gateway(loop).app()) as http:
        reply = http.post("/v1/predict", json={"text": "hello?", "timeout": 0.5})
    body = reply.json()
    assert reply.status_code == 504 and body["status"] == "timeout"
    assert body["request_id"] in body["detail"] and "worker" in body["detail"]


@pytest.mark.parametrize(("body", "code", "reason"), [
    (b"not json", 400, "not JSON"),
    (b"[1, 2]", 400, "expected a JSON object"),
    (b'{"text": 5}', 400, '"text" must be a string'),
    (b'{"texts": []}', 400, "non-empty list"),
    (b'{"text": "a", "texts": ["b"]}', 400, 'either "text"'),
    (b'{"text": "a", "timeout": -1}', 400, "timeout must be"),
    (b'{"text": "a", "timeout": true}', 400, "timeout must be"),
    (json.dumps({"texts": ["t"] * 300}).encode(), 413, "at most 256"),
    (b'{"text": "' + b"x" * (3 << 20) + b'"}', 413, "at most"),
])
def test_bad_predict_bodies_are_refused_with_the_reason(loop: Loop, body: bytes, code: int, reason: str) -> None:
    with TestClient(_gateway(loop).app()) as http:
        reply = http.post("/v1/predict", content=body, headers={"content-type": "application/json"})
    assert reply.status_code == code and reason in reply.json()["reason"], reply.text
    assert _topic(loop, loop.settings.requests_topic) == []  # nothing was sent


def test_writes_need_the_token_when_one_is_set(loop: Loop) -> None:
    gateway = _gateway(loop, api_token=SecretStr("s3cret-token"))
    with TestClient(gateway.app()) as http:
        for path, body in (("/v1/predict", {"text": "a"}), ("/v1/feedback", {"request_id": "r", "kind": "thumbs_up"})):
            assert http.post(path, json=body).status_code == 401
            assert http.post(path, json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = http.post("/v1/feedback", json={"request_id": "r", "kind": "thumbs_up"},
                       headers={"Authorization": "Bearer s3cret-token"})
        assert ok.status_code == 202
        assert http.get("/v1/status").status_code == 200  # reads need no token


def test_feedback_is_produced_to_the_feedback_topic(loop: Loop) -> None:
    with TestClient(_gateway(loop).app()) as http:
        ok = http.post("/v1/feedback", json={"request_id": "req-1", "kind": "label", "label": "billing"})
        assert ok.status_code == 202
        bad = http.post("/v1/feedback", json={"request_id": "req-1", "kind": "label"})
        wrong = http.post("/v1/feedback", json={"request_id": "req-1", "kind": "meh"})
    assert (bad.status_code, bad.json()["error"]) == (400, "missing_label")
    assert (wrong.status_code, wrong.json()["error"]) == (400, "invalid_kind")
    (raw,) = _topic(loop, loop.settings.feedback_topic)
    event = FeedbackEvent.model_validate_json(raw)
    assert (event.request_id, event.kind, event.label, event.event_id) == ("req-1", "label", "billing",
                                                                            ok.json()["event_id"])


def test_status_and_adapters(loop: Loop) -> None:
    loop.registry.record_cycle({"trigger": "count", "outcome": "promoted", "version": loop.version,
                                "reason": "holdout 0.500 -> 0.900", "duration_s": 12.5, "started_at": time.time(),
                                "candidate": {"holdout": 0.9, "reference": 0.85}, "active": {"holdout": 0.5}})
    with TestClient(_gateway(loop).app()) as http:
        status = http.get("/v1/status").json()
        assert status["active"] == loop.version and status["probation"] is None and status["buffer"] is None
        (cycle,) = status["last_cycles"]
        assert (cycle["trigger"], cycle["duration_s"], cycle["reason"]) == ("count", 12.5, "holdout 0.500 -> 0.900")
        assert status["learning_curve"][0]["holdout"] == 0.9
        (listed,) = http.get("/v1/adapters").json()["adapters"]
        assert listed["version"] == loop.version and listed["active"] is True
        detail = http.get(f"/v1/adapters/{loop.version}").json()
        assert detail["labels"] == ["billing", "lost_card", "other"] and detail["active"] is True
        assert set(detail["files"]) == {"adapter_model.safetensors", "adapter_config.json", "labels.json"}
        unknown = http.get("/v1/adapters/v000099-20260101T000000-abcdef")
        assert unknown.status_code == 404 and "unknown adapter version" in unknown.json()["reason"]
        for path in ("..%2F..%2Fetc%2Fpasswd", "v000001-20260101T000000-abcdef%0A", "%2E%2E", "x%2F..%2Fy"):
            reply = http.get(f"/v1/adapters/{path}")
            assert reply.status_code == 400, (path, reply.status_code, reply.text)
            assert "not an adapter version id" in reply.json()["reason"]
        for path in ("/v1/adapters/../../etc/passwd", "/v1/adapters/x/../../y"):  # as sent, not normalized
            code, reply = _raw_get(http.app, path)
            assert code == 400 and "not an adapter version id" in reply["reason"], (path, code, reply)
        page = http.get("/")
    assert page.status_code == 200 and loop.version in page.text and "<polyline" not in page.text
    assert 'id="learning-curve"' in page.text and "class=\"curve-holdout\"" in page.text


def test_a_label_map_changed_after_publishing_is_refused(loop: Loop) -> None:
    labels = Path(loop.settings.registry_url) / "versions" / loop.version / "labels.json"
    labels.write_text(json.dumps({"labels": ["evil", "b", "c"]}))
    with TestClient(_gateway(loop).app()) as http:
        reply = http.get(f"/v1/adapters/{loop.version}")
    assert reply.status_code == 500 and "checksum" in reply.json()["reason"]


def test_openapi_describes_every_route(loop: Loop) -> None:
    gateway = _gateway(loop)
    app = gateway.app()
    with TestClient(app) as http:
        spec = http.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    documented = {(path, method.upper()) for path, item in spec["paths"].items() for method in item}
    served = {(r.path.replace("{version:path}", "{version}"), m) for r in app.routes for m in r.methods
              if m != "HEAD" and r.path != "/openapi.json"}
    assert served == documented
    refs = {v for v in _values(spec) if isinstance(v, str) and v.startswith("#/components/schemas/")}
    assert {r.rsplit("/", 1)[1] for r in refs} <= set(spec["components"]["schemas"])


def _raw_get(app, path: str) -> tuple[int, dict]:
    """GET ``path`` exactly as given (HTTP clients normalize ``..`` away before sending)."""
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "headers": [], "client": ("t", 1),
             "server": ("t", 80), "root_path": ""}
    asyncio.run(app(scope, receive, send))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body)


def _values(obj: object) -> Iterator[object]:
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _values(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _values(v)
    else:
        yield obj


def _rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_200_concurrent_requests_are_all_answered_with_bounded_memory(loop: Loop) -> None:
    """A real uvicorn server, 200 requests at once, three rounds: every one answered, nothing left waiting,
    and the process does not grow round over round."""
    loop.start_worker()
    gateway = _gateway(loop)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(gateway.app(), host="127.0.0.1", port=port, log_level="warning",
                                           limit_concurrency=1000))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)

    async def round_of(n: int) -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=60) as http:
            return await asyncio.gather(*(http.post("/v1/predict", json={"text": f"request {i}", "timeout": 45})
                                          for i in range(n)))

    try:
        rss = []
        for _ in range(3):
            replies = asyncio.run(round_of(200))
            assert [r.status_code for r in replies] == [200] * 200
            assert {r.json()["adapter_version"] for r in replies} == {loop.version}
            assert len({r.json()["request_id"] for r in replies}) == 200
            assert gateway.client.in_flight == 0
            rss.append(_rss_mb())
    finally:
        server.should_exit = True
        thread.join(timeout=20)
    assert rss[2] - rss[0] < 30, f"RSS per round (MiB): {rss}"
