"""RequestClient on the in-memory transport against a real worker (tiny base model, constant adapters)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from loraloop.buffer.memory import MemoryRequestLog
from loraloop.client import Answer, Overloaded, PredictTimeout, RequestClient
from loraloop.metrics import Metrics
from loraloop.model import load_base, load_tokenizer
from loraloop.registry import make_registry
from loraloop.schemas import MAX_RECORD_BYTES, DeadLetter, InvalidMessage, Prediction
from loraloop.settings import Settings
from loraloop.testing import build_constant_adapter
from loraloop.transport.memory import MemoryBroker, MemoryTransport
from loraloop.transport.tail import tail
from services.worker import build_worker

LABELS = ["billing", "lost_card", "other"]


class Loop:
    """A registry with one active constant adapter, a memory broker and a worker serving on a thread."""

    def __init__(self, root: Path, base_dir: Path, **overrides: object) -> None:
        values = dict(base_model=str(base_dir), registry_url=str(root / "registry"), adapter_poll_s=0.05,
                      label_capacity=8, max_tokens=16, max_text_bytes=500, max_batch=16, max_wait_ms=2)
        values.update(overrides)
        self.settings = Settings(**values)
        self.registry = make_registry(self.settings)
        folder = build_constant_adapter(self.settings, LABELS, "lost_card", root / "adapter")
        self.version = self.registry.promote(self.registry.publish(folder)).version
        self.transport = MemoryTransport(MemoryBroker(partitions=4))
        self.metrics = Metrics(CollectorRegistry())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start_worker(self) -> None:
        worker = build_worker(self.settings, transport=self.transport, registry=self.registry,
                              request_log=MemoryRequestLog(ttl_s=60), metrics=Metrics(CollectorRegistry()),
                              base=load_base(self.settings), tokenizer=load_tokenizer(self.settings))
        self._thread = threading.Thread(target=worker.run, args=(self._stop,), daemon=True)
        self._thread.start()

    def client(self, **kwargs: object) -> RequestClient:
        return RequestClient(self.settings, transport=self.transport, metrics=self.metrics, **kwargs)

    def count(self, outcome: str) -> float:
        return self.metrics.registry.get_sample_value("loraloop_predict_requests_total", {"outcome": outcome}) or 0.0

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


@pytest.fixture()
def loop(tmp_path: Path, base_dir: Path) -> Iterator[Loop]:
    stack = Loop(tmp_path, base_dir)
    yield stack
    stack.stop()


def test_predict_returns_the_prediction_and_the_version_that_made_it(loop: Loop) -> None:
    loop.start_worker()
    with loop.client() as client:
        answer = client.predict("I lost my card yesterday", timeout=30)
        assert (answer.status, answer.label, answer.adapter_version) == ("answered", "lost_card", loop.version)
        assert answer.prediction.request_id == answer.request_id and answer.as_dict()["top_k"]
        answers = client.predict_many([f"text number {i}" for i in range(40)], timeout=30)
    assert [a.status for a in answers] == ["answered"] * 40
    assert len({a.request_id for a in answers}) == 40 and {a.adapter_version for a in answers} == {loop.version}
    assert loop.count("answered") == 41 and client.in_flight == 0


def test_dead_lettered_requests_return_their_reason(loop: Loop) -> None:
    """Oversize and blank texts are refused by the worker; the caller gets that reason, not a timeout."""
    loop.start_worker()
    with loop.client() as client:
        oversize = client.submit("x" * 600)  # max_text_bytes=500
        blank = client.submit("   ")
        fine = client.submit("where is my card")
        answers = [p.result(timeout=30) for p in (oversize, blank, fine)]
    assert [(a.status, a.reason) for a in answers] == [("dead_letter", "oversize_text"), ("dead_letter", "empty_text"),
                                                       ("answered", "")]
    assert "600 bytes, limit 500" in answers[0].detail
    assert loop.count("dead_letter") == 2


def test_redacted_dead_letters_are_matched_by_partition_and_offset(tmp_path: Path, base_dir: Path) -> None:
    loop = Loop(tmp_path, base_dir, redact_dead_letters=True)
    loop.start_worker()
    try:
        with loop.client() as client:
            answer = client.predict("y" * 600, timeout=30)
    finally:
        loop.stop()
    assert (answer.status, answer.reason) == ("dead_letter", "oversize_text")


def test_a_request_too_large_for_any_record_is_refused_without_sending(loop: Loop) -> None:
    with loop.client() as client:
        answer = client.predict("z" * (MAX_RECORD_BYTES + 1), timeout=1)
    assert (answer.status, answer.reason) == ("refused", "oversize_record")
    assert loop.transport.broker.partitions(loop.settings.requests_topic) == 4
    assert all(loop.transport.broker.end_offset(tp) == 0 for tp in _partitions(loop, loop.settings.requests_topic))


def test_no_worker_times_out_naming_the_request(loop: Loop) -> None:
    with loop.client() as client:
        started = time.monotonic()
        with pytest.raises(PredictTimeout) as error:
            client.predict("anyone there?", timeout=0.5, request_id="req-trace-me")
        assert time.monotonic() - started < 5
        assert error.value.request_id == "req-trace-me" and "req-trace-me" in str(error.value)
        assert client.in_flight == 0  # forgotten: a late prediction is ignored
        late = Prediction(request_id="req-trace-me", label="other", score=0.5, top_k=[],
                          adapter_version=loop.version, latency_ms=1.0)
        loop.transport.producer().send(loop.settings.predictions_topic, late.to_bytes())
        again = client.submit("second try", request_id="req-2")
    assert loop.count("timeout") == 1 and loop.count("answered") == 0
    assert again.result(timeout=0.1).status == "timeout"  # closed: what was waited for ends as timeout


def test_a_repeated_prediction_is_ignored_and_malformed_records_do_not_stop_the_reader(loop: Loop) -> None:
    producer = loop.transport.producer()
    topic = loop.settings.predictions_topic
    with loop.client() as client:
        pending = client.submit("hello", request_id="r1")
        producer.send(topic, b"not json")
        producer.send(loop.settings.dead_letter_topic, b'{"payload": 1}')
        for label in ("billing", "other"):  # at least once: the same request answered twice
            producer.send(topic, Prediction(request_id="r1", label=label, score=0.9, top_k=[],
                                            adapter_version=loop.version, latency_ms=1.0).to_bytes())
        assert pending.result(timeout=5).label == "billing"
        time.sleep(0.3)  # the repeat has been read by now
    assert loop.count("answered") == 1


def test_in_flight_requests_are_bounded_and_ids_unique(loop: Loop) -> None:
    with loop.client(max_in_flight=3) as client:
        for i in range(3):
            client.submit(f"t{i}", request_id=f"id{i}")
        with pytest.raises(Overloaded, match="3 requests in flight"):
            client.submit("one too many")
        assert client.in_flight == 3
    with loop.client() as client:
        client.submit("a", request_id="dup")
        with pytest.raises(ValueError, match="already waited for"):
            client.submit("b", request_id="dup")


def test_dead_letters_of_other_requests_are_not_taken_for_ours(loop: Loop) -> None:
    """A letter at another offset, or from another topic, leaves our request waiting."""
    with loop.client() as client:
        pending = client.submit("waiting", request_id="mine")
        letter = DeadLetter.of(b"{}", InvalidMessage("malformed_json", "x"), loop.settings.requests_topic, 3, 999)
        other = DeadLetter.of(b"{}", InvalidMessage("malformed_json", "x"), "some.other.topic", 0, 0)
        for item in (letter, other):
            loop.transport.producer().send(loop.settings.dead_letter_topic, item.to_bytes())
        assert pending.result(timeout=0.5).status == "timeout"


def test_tail_reads_only_what_comes_after_it_on_every_partition() -> None:
    transport = MemoryTransport(MemoryBroker(partitions=3))
    producer = transport.producer()
    for i in range(6):
        producer.send("t", f"old-{i}".encode(), key=str(i).encode())
    reader = tail(transport, ["t", "late"])
    for i in range(6):
        producer.send("t", f"new-{i}".encode(), key=str(i).encode())
    producer.send("late", b"first of a new topic")
    seen: list[bytes] = []
    deadline = time.monotonic() + 5
    while len(seen) < 7 and time.monotonic() < deadline:
        seen += [r.value for r in reader.poll(timeout_ms=100, max_records=4)]
    assert sorted(seen) == sorted([f"new-{i}".encode() for i in range(6)] + [b"first of a new topic"])


def _partitions(loop: Loop, topic: str):
    from loraloop.transport import TopicPartition

    return [TopicPartition(topic, p) for p in range(loop.transport.broker.partitions(topic))]


def test_answer_as_dict_names_the_reason() -> None:
    assert Answer("r", "dead_letter", reason="oversize_text", detail="d").as_dict() == {
        "request_id": "r", "status": "dead_letter", "reason": "oversize_text", "detail": "d"}
