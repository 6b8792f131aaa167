"""Feedback ingester against a real Kafka 0.9 broker and a real Redis request log and buffer."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from prometheus_client import CollectorRegistry

from feedback.client import FeedbackClient
from feedback.ingester import build_ingester
from loraloop.buffer import make_feedback_buffer, make_request_log
from loraloop.metrics import Metrics
from loraloop.schemas import DeadLetter, ServedRequest
from loraloop.settings import Settings
from loraloop.transport import TransportError, make_transport

pytestmark = pytest.mark.integration


def _dead_letters(settings: Settings, expected: int, timeout: float = 30.0) -> list[DeadLetter]:
    letters: list[DeadLetter] = []
    with make_transport(settings).consumer([settings.dead_letter_topic], f"reader-{uuid.uuid4().hex[:6]}") as c:
        deadline = time.monotonic() + timeout
        while len(letters) < expected and time.monotonic() < deadline:
            try:
                letters += [DeadLetter.model_validate_json(r.value) for r in c.poll(timeout_ms=500, max_records=100)]
            except TransportError:
                time.sleep(0.5)
    return letters


def _committed_and_ends(settings: Settings, partitions: int) -> tuple[list[int | None], list[int]]:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, api_version=(0, 9),
                             group_id=settings.ingester_group, enable_auto_commit=False, request_timeout_ms=5000)
    try:
        tps = [TopicPartition(settings.feedback_topic, p) for p in range(partitions)]
        ends = consumer.end_offsets(tps)
        return [consumer.committed(tp, timeout_ms=5000) for tp in tps], [ends[tp] for tp in tps]
    finally:
        consumer.close(autocommit=False)


def test_feedback_is_joined_into_redis_deduplicated_and_committed(kafka_broker, kafka_settings, redis_url) -> None:
    settings = kafka_settings(redis_url=redis_url, feedback_grace_s=1.0, allowed_labels="card,billing")
    kafka_broker.create_topic(settings.feedback_topic, 2)
    make_request_log(settings).record([ServedRequest(request_id=f"r{i}", text=f"text {i}", label="card", score=0.9,
                                                     adapter_version="v1") for i in range(1, 4)])
    with FeedbackClient(settings) as client:
        sent = [client.label("r1", "billing"), client.thumbs_up("r2"), client.thumbs_down("r3")]
        client.send(sent[0])  # the same event again: deduplicated
        client.thumbs_up("never-served")
        client.label("r1", "fraud")
        client.flush()
    with make_transport(settings).producer() as producer:
        producer.send(settings.feedback_topic, b"{not json", key=b"r1")
        producer.flush(timeout=30)

    metrics = Metrics(CollectorRegistry())
    ingester = build_ingester(settings, metrics=metrics)
    stop = threading.Event()
    thread = threading.Thread(target=ingester.run, args=(stop,), daemon=True)
    thread.start()

    def count(kind: str, outcome: str) -> float:
        return metrics.registry.get_sample_value("loraloop_feedback_events_total",
                                                 {"kind": kind, "outcome": outcome}) or 0.0

    deadline = time.monotonic() + 60
    while sum(count(k, o) for k in ("label", "thumbs_up", "thumbs_down", "invalid")
              for o in ("joined", "duplicate", "dead_letter")) < 7:
        assert time.monotonic() < deadline, "not every event was resolved"
        time.sleep(0.2)
    stop.set()
    thread.join(timeout=30)
    assert not thread.is_alive()

    assert (count("label", "joined"), count("label", "duplicate")) == (1, 1)
    buffer = make_feedback_buffer(settings)  # a fresh client: the examples are in Redis
    assert buffer.depth() == 3
    examples = buffer.claim("test", 100).examples
    assert sorted(e.event_id for e in examples) == sorted(e.event_id for e in sent)
    assert {e.request_id: (e.label, e.negative_label) for e in examples} == {
        "r1": ("billing", None), "r2": ("card", None), "r3": (None, "card")}
    assert metrics.registry.get_sample_value("loraloop_judged_total", {"adapter_version": "v1"}) == 3
    assert metrics.registry.get_sample_value("loraloop_correct_total", {"adapter_version": "v1"}) == 1

    letters = _dead_letters(settings, 3)
    assert sorted(d.reason for d in letters) == ["label_not_allowed", "malformed_json", "unknown_request"]
    committed, ends = _committed_and_ends(settings, 2)
    assert committed == ends and sum(ends) == 7
