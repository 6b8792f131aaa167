"""Feedback ingester on the in-memory transport and buffer: join rules, dedup, dead letters, offsets, faults."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from contextlib import redirect_stdout
from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry

from feedback.client import FeedbackClient
from feedback.http import serve_feedback
from feedback.ingester import FeedbackIngester, build_ingester
from feedback.join import Rejection, Retry, join, judgement, label_problem, parse_allowed
from loraloop.buffer import BufferError
from loraloop.buffer.memory import MemoryFeedbackBuffer, MemoryRequestLog
from loraloop.cli import main
from loraloop.metrics import Metrics
from loraloop.schemas import REASONS, DeadLetter, Example, FeedbackEvent, ServedRequest
from loraloop.settings import Settings
from loraloop.transport import TopicPartition
from loraloop.transport.memory import MemoryBroker, MemoryTransport
from tests.infra import free_port

SERVED = ServedRequest(request_id="r1", text="my card is lost", label="card", score=0.8, adapter_version="v1",
                       ts=100.0)


def _event(kind: str, label: str | None = None, request_id: str = "r1", ts: float = 100.0,
           event_id: str | None = None) -> FeedbackEvent:
    return FeedbackEvent(event_id=event_id or uuid.uuid4().hex, request_id=request_id, kind=kind, label=label, ts=ts)


# --- pure decisions ------------------------------------------------------------------------
@pytest.mark.parametrize(("event", "served", "allowed", "now", "expected"), [
    (_event("label", "billing"), SERVED, None, 101.0, ("example", "billing", None)),
    (_event("thumbs_up"), SERVED, None, 101.0, ("example", "card", None)),
    (_event("thumbs_down"), SERVED, None, 101.0, ("example", None, "card")),
    (_event("thumbs_up", label="ignored"), SERVED, None, 101.0, ("example", "card", None)),
    (_event("label", "billing"), SERVED, frozenset({"card", "billing"}), 101.0, ("example", "billing", None)),
    (_event("label", "fraud"), SERVED, frozenset({"card", "billing"}), 101.0, ("reject", "label_not_allowed")),
    (_event("label", "x" * 65), SERVED, None, 101.0, ("reject", "label_not_allowed")),
    (_event("label", "bad\nlabel"), SERVED, None, 101.0, ("reject", "label_not_allowed")),
    (_event("label", "fraud"), None, frozenset({"card"}), 101.0, ("reject", "label_not_allowed")),
    (_event("thumbs_up"), None, None, 105.0, ("retry", 110.0)),
    (_event("thumbs_up"), None, None, 110.0, ("reject", "unknown_request")),
    (_event("thumbs_down", ts=50.0), None, None, 101.0, ("reject", "unknown_request")),
])
def test_join_rules(event: FeedbackEvent, served: ServedRequest | None, allowed: frozenset[str] | None,
                    now: float, expected: tuple) -> None:
    result = join(event, served, allowed, now=now, grace_s=10.0)
    if expected[0] == "example":
        assert isinstance(result, Example)
        assert (result.label, result.negative_label) == expected[1:]
        assert (result.text, result.served_label, result.adapter_version) == ("my card is lost", "card", "v1")
        assert (result.event_id, result.request_id, result.kind) == (event.event_id, "r1", event.kind)
    elif expected[0] == "reject":
        assert isinstance(result, Rejection) and result.reason == expected[1] and result.reason in REASONS
    else:
        assert result == Retry("r1", expected[1])


def test_grace_runs_from_first_sight_when_the_producer_clock_is_ahead() -> None:
    future = _event("thumbs_up", ts=1000.0)
    assert isinstance(join(future, None, None, now=105.0, grace_s=10.0, first_seen=100.0), Retry)
    assert join(future, None, None, now=111.0, grace_s=10.0, first_seen=100.0).reason == "unknown_request"


@pytest.mark.parametrize(("kind", "label", "expected"), [
    ("label", "card", (True, True)), ("label", "billing", (True, False)),
    ("thumbs_up", None, (True, True)), ("thumbs_down", None, (True, False)),
])
def test_judgement(kind: str, label: str | None, expected: tuple[bool, bool]) -> None:
    assert judgement(join(_event(kind, label), SERVED, None, now=101.0, grace_s=1.0)) == expected


def test_allowed_labels_parsing() -> None:
    assert parse_allowed("a, b ,,") == frozenset({"a", "b"}) and parse_allowed(" , ") is None
    assert label_problem("ok label", None) is None and label_problem("", None) is not None
    assert "'z'" in label_problem("z", frozenset({"a"}))


# --- the ingester on the memory transport -----------------------------------------------------
class FlakyLog(MemoryRequestLog):
    down = False

    def get(self, request_id: str) -> ServedRequest | None:
        if self.down:
            raise BufferError(f"request log down (get {request_id!r})")
        return super().get(request_id)


class FlakyBuffer(MemoryFeedbackBuffer):
    down = False

    def append(self, example: Example) -> str:
        if self.down:
            raise BufferError("buffer down")
        return super().append(example)


@dataclass
class Stack:
    settings: Settings
    transport: MemoryTransport
    log: FlakyLog
    buffer: FlakyBuffer
    metrics: Metrics

    def ingester(self, **kwargs: object) -> FeedbackIngester:
        parts = dict(transport=self.transport, request_log=self.log, buffer=self.buffer, metrics=self.metrics)
        return build_ingester(self.settings, **{**parts, **kwargs})

    def serve(self, *ids: str, label: str = "card", version: str = "v1") -> None:
        self.log.record([ServedRequest(request_id=i, text=f"text of {i}", label=label, score=0.9,
                                       adapter_version=version) for i in ids])

    def send(self, event: FeedbackEvent | bytes, key: str = "k") -> tuple[int, int]:
        raw = event if isinstance(event, bytes) else event.to_bytes()
        key = key if isinstance(event, bytes) else event.request_id
        return self.transport.broker.append(self.settings.feedback_topic, key.encode(), raw)

    def dead_letters(self) -> list[DeadLetter]:
        broker, topic = self.transport.broker, self.settings.dead_letter_topic
        return [DeadLetter.model_validate_json(r.value) for p in range(broker.partitions(topic))
                for r in broker.read(TopicPartition(topic, p), 0, 10**9)]

    def committed(self) -> dict[int, int]:
        broker, s = self.transport.broker, self.settings
        return {p: broker.committed(s.ingester_group, TopicPartition(s.feedback_topic, p)) for p in range(2)}

    def ends(self) -> dict[int, int]:
        broker, topic = self.transport.broker, self.settings.feedback_topic
        return {p: broker.end_offset(TopicPartition(topic, p)) for p in range(2)}

    def examples(self) -> list[Example]:
        return self.buffer.claim("test", 10_000).examples

    def count(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(f"loraloop_{name}_total", labels) or 0.0


@pytest.fixture()
def make_stack() -> Callable[..., Stack]:
    def make(**overrides: object) -> Stack:
        tag = uuid.uuid4().hex[:8]
        settings = Settings(**{"feedback_topic": f"fb-{tag}", "dead_letter_topic": f"dlq-{tag}",
                               "ingester_group": f"ingest-{tag}", "feedback_grace_s": 0.0, **overrides})
        buffer = FlakyBuffer(max_items=settings.buffer_max, trim="reject", replay_per_label=10, claim_idle_s=60,
                             dedup_ttl_s=3600)
        return Stack(settings, MemoryTransport(MemoryBroker(partitions=2)), FlakyLog(3600), buffer,
                     Metrics(CollectorRegistry()))

    return make


@pytest.fixture()
def stack(make_stack: Callable[..., Stack]) -> Stack:
    return make_stack()


def poll_until(ingesters: FeedbackIngester | list[FeedbackIngester], done: Callable[[], bool],
               timeout: float = 5.0) -> None:
    ingesters = ingesters if isinstance(ingesters, list) else [ingesters]
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "condition not reached"
        for ingester in ingesters:
            ingester.poll_once(timeout_ms=20)


def test_events_are_joined_buffered_and_committed(stack: Stack) -> None:
    stack.serve("r1", "r2", "r3")
    stack.send(_event("label", "billing", "r1"))
    stack.send(_event("thumbs_up", request_id="r2"))
    stack.send(_event("thumbs_down", request_id="r3"))
    with stack.ingester() as ingester:
        poll_until(ingester, lambda: stack.committed() == stack.ends())
    by_request = {e.request_id: e for e in stack.examples()}
    assert (by_request["r1"].label, by_request["r1"].served_label) == ("billing", "card")
    assert (by_request["r2"].label, by_request["r3"].label, by_request["r3"].negative_label) == ("card", None, "card")
    assert by_request["r1"].text == "text of r1" and by_request["r1"].adapter_version == "v1"
    for kind in ("label", "thumbs_up", "thumbs_down"):
        assert stack.count("feedback_events", kind=kind, outcome="joined") == 1
    assert stack.dead_letters() == []
    assert stack.metrics.registry.get_sample_value("loraloop_buffer_depth") == 3


def test_duplicate_event_ids_are_counted_once(stack: Stack) -> None:
    stack.serve("r1")
    event = _event("label", "billing")
    for _ in range(3):
        stack.send(event)
    with stack.ingester() as ingester:
        poll_until(ingester, lambda: stack.committed() == stack.ends())
    assert [e.event_id for e in stack.examples()] == [event.event_id]
    assert stack.count("feedback_events", kind="label", outcome="joined") == 1
    assert stack.count("feedback_events", kind="label", outcome="duplicate") == 2
    assert stack.count("judged", adapter_version="v1") == 1


def test_unknown_request_is_dead_lettered_once_grace_ends(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(feedback_grace_s=0.3)
    stack.send(_event("thumbs_up", request_id="nobody", ts=time.time()))
    with stack.ingester() as ingester:
        ingester.poll_once(timeout_ms=20)
        assert ingester.held == 1 and stack.dead_letters() == [] and sum(stack.committed().values()) == 0
        poll_until(ingester, lambda: stack.committed() == stack.ends())
    [letter] = stack.dead_letters()
    assert letter.reason == "unknown_request" and "'nobody'" in letter.detail
    assert FeedbackEvent.model_validate_json(letter.payload).request_id == "nobody"
    assert stack.count("feedback_events", kind="thumbs_up", outcome="dead_letter") == 1
    assert stack.count("dead_letters", source="feedback", reason="unknown_request") == 1


def test_expired_request_is_dead_lettered(stack: Stack) -> None:
    stack.log = FlakyLog(ttl_s=0.05)
    stack.serve("r1")
    time.sleep(0.1)
    stack.send(_event("thumbs_down"))
    with stack.ingester() as ingester:
        poll_until(ingester, lambda: stack.committed() == stack.ends())
    assert [d.reason for d in stack.dead_letters()] == ["unknown_request"] and stack.examples() == []


def test_label_outside_the_allowed_set_is_dead_lettered(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(allowed_labels="card,billing")
    stack.serve("r1")
    stack.send(_event("label", "fraud"))
    stack.send(_event("label", "billing"))
    with stack.ingester() as ingester:
        poll_until(ingester, lambda: stack.committed() == stack.ends())
    [letter] = stack.dead_letters()
    assert letter.reason == "label_not_allowed" and "'fraud'" in letter.detail
    assert [e.label for e in stack.examples()] == ["billing"]


def test_malformed_records_are_dead_lettered(stack: Stack) -> None:
    stack.send(b"{not json")
    stack.send(b'{"event_id": "e1", "request_id": "r1", "kind": "label"}')
    stack.send(b'{"event_id": "e2", "request_id": "r1", "kind": "smile"}')
    with stack.ingester() as ingester:
        poll_until(ingester, lambda: stack.committed() == stack.ends())
    assert sorted(d.reason for d in stack.dead_letters()) == ["invalid_kind", "malformed_json", "missing_label"]
    assert any(d.payload == "{not json" for d in stack.dead_letters())
    assert stack.count("feedback_events", kind="invalid", outcome="dead_letter") == 3


def test_early_feedback_is_joined_when_its_request_appears_and_holds_back_the_commit(
        make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(feedback_grace_s=30.0)
    stack.serve("r-known")
    early = _event("label", "billing", request_id="r-early", ts=time.time())
    partition, early_offset = stack.send(early)
    later = [_event("thumbs_up", request_id="r-known") for _ in range(3)]
    for e in later:  # r-known may share the partition: later records are handled, not committed past r-early
        stack.send(e)
    with stack.ingester() as ingester:
        poll_until(ingester, lambda: stack.buffer.depth() == 3)
        assert ingester.held == 1 and stack.committed()[partition] == early_offset
        assert stack.committed() != stack.ends()
        stack.serve("r-early", label="card")
        poll_until(ingester, lambda: stack.committed() == stack.ends())
        assert ingester.held == 0
    assert {e.request_id for e in stack.examples()} == {"r-early", "r-known"} and stack.dead_letters() == []


def test_held_events_survive_an_ingester_that_stops(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(feedback_grace_s=30.0)
    stack.serve("r1")
    stack.send(_event("thumbs_up"))
    stack.send(_event("label", "billing", request_id="r-late", ts=time.time()))
    with stack.ingester() as first:
        poll_until(first, lambda: stack.buffer.depth() == 1 and first.held == 1)
    stack.serve("r-late")  # after the first ingester left: its held event was never committed
    with stack.ingester() as second:
        poll_until(second, lambda: stack.committed() == stack.ends())
    assert sorted(e.request_id for e in stack.examples()) == ["r-late", "r1"]
    assert stack.count("feedback_events", kind="thumbs_up", outcome="joined") == 1


def test_contradictory_labels_are_all_buffered(stack: Stack) -> None:
    stack.serve("r1")
    events = [_event("label", "billing"), _event("label", "fraud"), _event("thumbs_down"), _event("thumbs_up")]
    for e in events:
        stack.send(e)
    with stack.ingester() as ingester:
        poll_until(ingester, lambda: stack.committed() == stack.ends())
    got = sorted((e.kind, e.label or "", e.negative_label or "") for e in stack.examples())
    assert got == [("label", "billing", ""), ("label", "fraud", ""), ("thumbs_down", "", "card"),
                   ("thumbs_up", "card", "")]


def test_judged_and_correct_count_only_new_examples(stack: Stack) -> None:
    stack.serve("r1", label="card", version="v1")
    stack.serve("r2", label="card", version="v2")
    first = _event("label", "card")
    for e in (first, first, _event("label", "billing"), _event("thumbs_up"), _event("thumbs_down"),
              _event("thumbs_up", request_id="r2"), _event("thumbs_up", request_id="unknown")):
        stack.send(e)
    with stack.ingester() as ingester:
        poll_until(ingester, lambda: stack.committed() == stack.ends())
    assert (stack.count("judged", adapter_version="v1"), stack.count("correct", adapter_version="v1")) == (4, 2)
    assert (stack.count("judged", adapter_version="v2"), stack.count("correct", adapter_version="v2")) == (1, 1)


def test_full_buffer_dead_letters(stack: Stack) -> None:
    stack.buffer = FlakyBuffer(max_items=1, trim="reject", replay_per_label=0, claim_idle_s=60, dedup_ttl_s=60)
    stack.serve("r1")
    stack.send(_event("thumbs_up"))
    stack.send(_event("thumbs_down"))
    with stack.ingester() as ingester:
        poll_until(ingester, lambda: stack.committed() == stack.ends())
    assert [d.reason for d in stack.dead_letters()] == ["buffer_full"] and stack.buffer.depth() == 1


@pytest.mark.parametrize("store", ["log", "buffer"])
def test_store_down_commits_nothing_then_recovers(stack: Stack, store: str) -> None:
    stack.serve("r1", "r2")
    failing = stack.log if store == "log" else stack.buffer
    failing.down = True
    for i in range(4):
        stack.send(_event("thumbs_up", request_id=f"r{1 + i % 2}"))
    with stack.ingester() as ingester:
        for _ in range(3):
            ingester.poll_once(timeout_ms=20)  # never raises
        assert sum(stack.committed().values()) == 0 and stack.buffer.depth() == 0 and not ingester.ready()
        assert stack.dead_letters() == []
        failing.down = False
        poll_until(ingester, lambda: stack.committed() == stack.ends())
        assert ingester.ready()
    assert len(stack.examples()) == 4 and stack.count("feedback_events", kind="thumbs_up", outcome="joined") == 4


def test_two_ingesters_share_the_partitions(stack: Stack) -> None:
    ids = [f"r{i}" for i in range(40)]
    stack.serve(*ids)
    for i in ids:
        stack.send(_event("thumbs_up", request_id=i))
    with stack.ingester() as a, stack.ingester() as b:
        poll_until([a, b], lambda: stack.committed() == stack.ends())
    assert sorted(e.request_id for e in stack.examples()) == sorted(ids)
    assert stack.count("feedback_events", kind="thumbs_up", outcome="joined") == 40


def test_run_stops_on_the_event(stack: Stack) -> None:
    stack.serve("r1")
    stack.send(_event("thumbs_up"))
    stop = threading.Event()
    thread = threading.Thread(target=stack.ingester().run, args=(stop,))
    thread.start()
    deadline = time.monotonic() + 5
    while stack.committed() != stack.ends() and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    thread.join(timeout=5)
    assert not thread.is_alive() and stack.committed() == stack.ends() and stack.buffer.depth() == 1


def test_ingest_directly(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(feedback_grace_s=5.0)
    stack.serve("r1")
    ingester = stack.ingester()
    event = _event("label", "billing", ts=time.time())
    assert ingester.ingest(event) == "joined" and ingester.ingest(event) == "duplicate"
    timer = threading.Timer(0.2, stack.serve, args=("r-early",))
    timer.start()
    assert ingester.ingest(_event("thumbs_up", request_id="r-early", ts=time.time())) == "joined"
    assert ingester.ingest(_event("thumbs_up", request_id="r-old", ts=time.time() - 60)) == "dead_letter"
    assert [d.reason for d in stack.dead_letters()] == ["unknown_request"]
    ingester.close()


# --- client, CLI and HTTP -----------------------------------------------------------------------------
def test_client_round_trip(stack: Stack) -> None:
    stack.serve("r1", "r2", "r3")
    with FeedbackClient(stack.transport, topic=stack.settings.feedback_topic) as client:
        sent = [client.label("r1", "billing"), client.thumbs_up("r2"), client.thumbs_down("r3")]
        with pytest.raises(ValueError, match="''"):
            client.label("r1", "")
    with stack.ingester() as ingester:
        poll_until(ingester, lambda: stack.committed() == stack.ends())
    assert {e.event_id for e in stack.examples()} == {e.event_id for e in sent}
    assert len({e.event_id for e in sent}) == 3


def test_cli_send(stack: Stack, monkeypatch) -> None:
    stack.serve("r1")
    args = ["feedback", "send", "--request-id", "r1", "--kind", "label", "--label", "billing",
            "--feedback-topic", stack.settings.feedback_topic, "--source", "agent-7"]
    assert main(args) == 2  # the in-memory transport: no other process could read the event
    out = io.StringIO()
    # The command on a broker transport; here the shared in-process broker stands for it.
    monkeypatch.setattr("feedback.client.make_transport", lambda settings: MemoryTransport.shared())
    with redirect_stdout(out):
        rc = main([*args, "--transport", "kafka"])
    assert rc == 0
    event = FeedbackEvent.model_validate_json(out.getvalue())
    assert (event.request_id, event.kind, event.label, event.source) == ("r1", "label", "billing", "agent-7")
    assert main(["feedback", "send", "--request-id", "r1", "--kind", "label", "--transport", "kafka"]) == 2
    shared = build_ingester(stack.settings, transport=MemoryTransport.shared(), request_log=stack.log,
                            buffer=stack.buffer, metrics=stack.metrics)
    with shared:
        poll_until(shared, lambda: stack.buffer.depth() == 1)
    assert [e.event_id for e in stack.examples()] == [event.event_id]


def _post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_http_endpoint_round_trip(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(allowed_labels="card,billing")
    stack.serve("r1", "r2")
    server = serve_feedback(stack.settings, port=0, transport=stack.transport, host="127.0.0.1")
    url = f"http://127.0.0.1:{server.port}"
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=5) as r:
            assert r.status == 200
        status, one = _post(f"{url}/feedback", b'{"event_id": "e1", "request_id": "r1", "kind": "thumbs_up"}')
        assert (status, one) == (202, {"event_ids": ["e1"]})
        status, many = _post(f"{url}/feedback", json.dumps([{"request_id": "r2", "kind": "label", "label": "billing"},
                                                             {"request_id": "r1", "kind": "thumbs_down"}]).encode())
        assert status == 202 and len(many["event_ids"]) == 2
        status, bad = _post(f"{url}/feedback", b"{oops")
        assert status == 400 and bad["reason"] == "malformed_json"
        status, bad = _post(f"{url}/feedback", json.dumps([{"request_id": "r1", "kind": "thumbs_up"},
                                                           {"request_id": "r1", "kind": "label",
                                                            "label": "fraud"}]).encode())
        assert (status, bad["reason"], bad["index"]) == (400, "label_not_allowed", 1)
    finally:
        server.close()
    with stack.ingester() as ingester:
        poll_until(ingester, lambda: stack.committed() == stack.ends())
    assert sorted(e.event_id for e in stack.examples()) == sorted(["e1", *many["event_ids"]])


def _metric_line(port: int, prefix: str) -> str | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        return next((line for line in r.read().decode().splitlines() if line.startswith(prefix)), None)


def test_cli_run_serves_http_and_stops_on_sigterm(tmp_path) -> None:
    metrics_port, http_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "loraloop.cli", "feedback", "run", "--metrics-port",
                             str(metrics_port), "--feedback-http-port", str(http_port), "--feedback-grace-s", "0"],
                            env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        status = None
        while status is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                status, _ = _post(f"http://127.0.0.1:{http_port}/feedback",
                                  b'{"event_id": "e1", "request_id": "nobody", "kind": "thumbs_up"}')
            except OSError:
                time.sleep(0.2)
        assert status == 202, proc.stdout.read() if proc.poll() is not None else "no endpoint"
        want = 'loraloop_feedback_events_total{kind="thumbs_up",outcome="dead_letter"} 1.0'
        while _metric_line(metrics_port, want) is None:  # this process has no request log entry for it
            assert time.monotonic() < deadline, "event not dead-lettered"
            time.sleep(0.1)
        assert _metric_line(metrics_port, 'loraloop_build_info{role="ingester"') is not None
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert "SIGTERM received" in output and "ingester stopped" in output


@pytest.mark.parametrize(("kind", "label", "served", "shadow", "pair"), [
    ("label", "b", "a", "b", (False, True)),
    ("label", "a", "a", "b", (True, False)),
    ("label", "c", "a", "b", (False, False)),
    ("thumbs_up", None, "a", "a", (True, True)),
    ("thumbs_up", None, "a", "b", (True, False)),
    ("thumbs_down", None, "a", "a", (False, False)),
    ("thumbs_down", None, "a", "b", None),  # the shadow's answer is not judged by a thumbs-down
    ("label", "a", "a", None, None),  # not shadow-scored
])
def test_paired_judgement(kind: str, label: str | None, served: str, shadow: str | None, pair) -> None:
    from feedback.join import join, paired_judgement

    request = ServedRequest(request_id="r", text="t", label=served, score=0.9, adapter_version="v2", ts=0.0,
                            shadow_version="v1" if shadow else None, shadow_label=shadow)
    event = FeedbackEvent(event_id="e", request_id="r", kind=kind, label=label, ts=0.0)
    assert paired_judgement(join(event, request, None, 0.0, 10.0), request) == pair


# --- store faults, durability, per-record boundaries ------------------------------------------------
def test_missing_request_after_a_request_log_outage_waits_then_is_replayable(make_stack) -> None:
    stack = make_stack(feedback_store_retry_s=0.6)
    stack.log.down = True
    stack.send(_event("thumbs_up", request_id="lost-while-down", ts=time.time()))
    with stack.ingester() as ingester:
        for _ in range(3):
            ingester.poll_once(timeout_ms=20)
        assert ingester.held == 1 and stack.dead_letters() == []
        stack.log.down = False
        time.sleep(0.3)  # the 2 s backoff is not waited for here: poll until the log answers again
        deadline = time.monotonic() + 3
        while ingester.held and stack.dead_letters() == [] and time.monotonic() < deadline:
            ingester.poll_once(timeout_ms=20)
            if ingester.held:
                assert stack.dead_letters() == []  # grace 0, yet not dead-lettered as unknown
        poll_until(ingester, lambda: stack.committed() == stack.ends())
    [letter] = stack.dead_letters()
    assert letter.reason == "request_log_unavailable" and "'lost-while-down'" in letter.detail
    assert "unreachable" in letter.detail and "replay this dead letter" in letter.detail
    assert FeedbackEvent.model_validate_json(letter.payload).request_id == "lost-while-down"  # replayable
    assert stack.count("dead_letters", source="feedback", reason="request_log_unavailable") == 1


def test_request_logged_again_within_the_retry_is_joined(make_stack) -> None:
    stack = make_stack(feedback_store_retry_s=30.0)
    stack.log.down = True
    stack.send(_event("label", "billing", request_id="relogged", ts=time.time()))
    with stack.ingester() as ingester:
        ingester.poll_once(timeout_ms=20)
        stack.log.down = False
        time.sleep(0.2)
        for _ in range(20):
            ingester.poll_once(timeout_ms=20)
        assert ingester.held == 1 and stack.dead_letters() == []
        stack.serve("relogged")
        poll_until(ingester, lambda: stack.committed() == stack.ends(), timeout=5)
    assert [e.request_id for e in stack.examples()] == ["relogged"] and stack.dead_letters() == []


class RestartingLog(FlakyLog):
    started = None

    def started_at(self) -> float | None:
        return self.started


def test_a_request_log_restart_while_running_is_evidence_too(make_stack) -> None:
    stack = make_stack(feedback_store_retry_s=0.3)
    stack.log = RestartingLog(3600)
    stack.log.started = time.time() - 1000  # up long before the ingester: no evidence
    stack.send(_event("thumbs_up", request_id="never-served", ts=time.time()))
    with stack.ingester() as ingester:
        poll_until(ingester, lambda: stack.committed() == stack.ends())
        assert [d.reason for d in stack.dead_letters()] == ["unknown_request"]
        stack.log.started = time.time() + 2  # it restarted while the ingester ran
        stack.send(_event("thumbs_up", request_id="lost-in-restart", ts=time.time()))
        ingester.poll_once(timeout_ms=20)
        assert ingester.held == 1
        poll_until(ingester, lambda: stack.committed() == stack.ends())
    assert [d.reason for d in stack.dead_letters()] == ["unknown_request", "request_log_unavailable"]
    assert "restarted at unix time" in stack.dead_letters()[1].detail


class PoisonLog(FlakyLog):
    def get_many(self, request_ids: list[str]) -> dict[str, ServedRequest]:
        if "poison-log" in request_ids:
            raise ValueError("cannot encode key")
        return super().get_many(request_ids)

    def get(self, request_id: str) -> ServedRequest | None:
        if request_id == "poison-log":
            raise ValueError(f"cannot encode key {request_id!r}")
        return super().get(request_id)


class PoisonBuffer(FlakyBuffer):
    def append_many(self, examples: list[Example]) -> list[str]:
        if any(e.request_id == "poison-buffer" for e in examples):
            raise TypeError("cannot serialize")
        return super().append_many(examples)

    def append(self, example: Example) -> str:
        if example.request_id == "poison-buffer":
            raise TypeError(f"cannot serialize {example.event_id!r}")
        return super().append(example)


def test_a_step_that_raises_dead_letters_only_its_event(stack: Stack) -> None:
    stack.log = PoisonLog(3600)
    stack.buffer = PoisonBuffer(max_items=100, trim="reject", replay_per_label=0, claim_idle_s=60, dedup_ttl_s=60)
    stack.serve("r1", "r2", "poison-buffer")
    for request_id in ("r1", "poison-log", "r2", "poison-buffer"):
        stack.send(_event("thumbs_up", request_id=request_id), key="same")
    with stack.ingester() as ingester:
        poll_until(ingester, lambda: stack.committed() == stack.ends())
    letters = stack.dead_letters()
    assert sorted((d.reason, FeedbackEvent.model_validate_json(d.payload).request_id) for d in letters) == [
        ("ingest_error", "poison-buffer"), ("ingest_error", "poison-log")]
    assert any("TypeError" in d.detail for d in letters) and any("ValueError" in d.detail for d in letters)
    assert sorted(e.request_id for e in stack.examples()) == ["r1", "r2"]


def test_a_decoder_that_raises_anything_is_one_dead_letter(stack: Stack, monkeypatch) -> None:
    import feedback.ingester as module

    real = module.decode_feedback

    def decode(raw):
        if b"boom" in raw:
            raise RecursionError("maximum recursion depth exceeded")
        return real(raw)

    monkeypatch.setattr(module, "decode_feedback", decode)
    stack.serve("r1")
    stack.send(b'{"boom": 1}')
    stack.send(_event("thumbs_up"))
    with stack.ingester() as ingester:
        poll_until(ingester, lambda: stack.committed() == stack.ends())
    [letter] = stack.dead_letters()
    assert letter.reason == "ingest_error" and "RecursionError" in letter.detail
    assert len(stack.examples()) == 1


def test_redacted_dead_letters_keep_no_payload(make_stack) -> None:
    stack = make_stack(redact_dead_letters=True, redaction_key="k")
    stack.send(b"{secret user text")
    with stack.ingester() as ingester:
        poll_until(ingester, lambda: stack.committed() == stack.ends())
    [letter] = stack.dead_letters()
    assert letter.reason == "malformed_json" and letter.payload == "" and "secret" not in letter.model_dump_json()


class NonDurableBuffer(FlakyBuffer):
    instance = "a"

    def durability(self):
        from loraloop.buffer import Durability

        return Durability("none", False, "test redis without persistence")

    def instance_id(self) -> str | None:
        return self.instance


def test_a_non_durable_buffer_is_refused_by_default(stack: Stack) -> None:
    from feedback.ingester import NotDurable

    stack.buffer = NonDurableBuffer(max_items=100, trim="reject", replay_per_label=0, claim_idle_s=60, dedup_ttl_s=60)
    stack.serve("r1")
    stack.send(_event("thumbs_up"))
    with pytest.raises(NotDurable, match="test redis without persistence"):
        stack.ingester().run(threading.Event())
    with stack.ingester() as ingester, pytest.raises(NotDurable, match="buffer_require_durable=false"):
        poll_until(ingester, lambda: False)
    assert stack.buffer.depth() == 0 and sum(stack.committed().values()) == 0


def test_a_non_durable_buffer_when_allowed_warns_and_counts_what_a_restart_lost(make_stack, caplog) -> None:
    stack = make_stack(buffer_require_durable=False)
    stack.buffer = NonDurableBuffer(max_items=100, trim="reject", replay_per_label=0, claim_idle_s=60, dedup_ttl_s=60)
    stack.serve("r1")
    for _ in range(3):
        stack.send(_event("thumbs_up"))
    with stack.ingester() as ingester:
        poll_until(ingester, lambda: stack.committed() == stack.ends())
        assert stack.metrics.registry.get_sample_value("loraloop_buffer_durable") == 0
        assert "FEEDBACK BUFFER NOT DURABLE" in caplog.text
        stack.buffer.claim("gone", 100)  # what a restart without persistence does: the entries vanish
        stack.buffer._claims.clear()
        stack.buffer.instance = "b"
        stack.send(_event("thumbs_up"))
        poll_until(ingester, lambda: stack.committed() == stack.ends())
    assert stack.count("buffer_lost") == 3 and "up to 3 buffered examples lost" in caplog.text


def test_drop_oldest_is_counted(stack: Stack) -> None:
    stack.buffer = FlakyBuffer(max_items=2, trim="drop_oldest", replay_per_label=0, claim_idle_s=60, dedup_ttl_s=60)
    stack.serve("r1")
    for _ in range(5):
        stack.send(_event("thumbs_up"))
    with stack.ingester() as ingester:
        poll_until(ingester, lambda: stack.committed() == stack.ends())
    assert stack.count("buffer_dropped", reason="drop_oldest") == 3 and stack.buffer.depth() == 2


def test_cli_run_refuses_an_open_endpoint_beyond_loopback(capsys) -> None:
    rc = main(["feedback", "run", "--feedback-http-port", str(free_port()), "--feedback-http-host", "0.0.0.0"])
    assert rc == 2 and "beyond loopback, without a token" in capsys.readouterr().err
