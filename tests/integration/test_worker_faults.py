"""Worker faults against real servers: a Kafka broker restart, an unreachable Redis."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from loraloop.buffer import make_request_log
from loraloop.metrics import Metrics
from loraloop.model import load_base
from loraloop.registry import make_registry
from loraloop.schemas import Prediction, Request
from loraloop.settings import Settings
from loraloop.testing import build_constant_adapter, save_tiny_base_model
from loraloop.transport import TopicPartition, TransportError, make_transport
from loraloop.transport.memory import MemoryBroker, MemoryTransport
from services.worker import build_worker

pytestmark = pytest.mark.integration
torch.set_num_threads(1)


def _promote_constant(settings: Settings, root: Path, favoured: str = "b") -> str:
    folder = build_constant_adapter(settings, ["a", "b", "c"], favoured, root / f"adapter-{uuid.uuid4().hex[:6]}",
                                    base=load_base(settings))
    registry = make_registry(settings)
    return registry.promote(registry.publish(folder)).version


def _send_steadily(producer, topic: str, ids: list[str], interval: float) -> None:
    """One request every ``interval`` seconds, then a flush; a refused batch is sent again."""
    pending: list[str] = []
    for i in ids:
        pending.append(i)
        try:
            producer.send(topic, Request(id=i, text=f"where is my card {i}").to_bytes(), key=i.encode())
        except TransportError:
            pass  # resent below
        time.sleep(interval)
    for _ in range(10):
        try:
            producer.flush(timeout=30)
            return
        except TransportError:  # some sends failed while the broker was down: send them all again
            for i in pending:
                producer.send(topic, Request(id=i, text=f"where is my card {i}").to_bytes(), key=i.encode())


def _collect_predictions(settings: Settings, expected: set[str], timeout: float) -> dict[str, Prediction]:
    transport = make_transport(settings)
    seen: dict[str, Prediction] = {}
    with transport.consumer([settings.predictions_topic], f"reader-{uuid.uuid4().hex[:6]}") as consumer:
        deadline = time.monotonic() + timeout
        while not expected <= set(seen) and time.monotonic() < deadline:
            try:
                records = consumer.poll(timeout_ms=500, max_records=500)
            except TransportError:
                time.sleep(0.5)
                continue
            for r in records:
                p = Prediction.model_validate_json(r.value)
                seen[p.request_id] = p
    return seen


def test_kafka_broker_restart_loses_nothing(kafka_broker, kafka_settings, tmp_path: Path) -> None:
    base = save_tiny_base_model(tmp_path / "base")
    settings = kafka_settings(base_model=str(base), registry_url=str(tmp_path / "registry"), label_capacity=8,
                              adapter_poll_s=0.1, max_batch=16, max_wait_ms=5)
    version = _promote_constant(settings, tmp_path)
    metrics = Metrics(CollectorRegistry())
    worker = build_worker(settings, metrics=metrics)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), name="worker")
    thread.start()
    producer = make_transport(settings).producer()
    ids = [f"req-{i:04d}" for i in range(300)]
    sender = threading.Thread(target=_send_steadily, args=(producer, settings.requests_topic, ids, 0.02))
    try:
        sender.start()
        time.sleep(1.5)  # the worker is serving when the broker goes away, and requests keep coming
        kafka_broker.restart()
        sender.join(timeout=180)
        seen = _collect_predictions(settings, set(ids), timeout=120)
    finally:
        producer.close()
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive()
    missing = sorted(set(ids) - set(seen))
    assert not missing, f"{len(missing)} requests never answered, e.g. {missing[:5]}"
    assert {p.adapter_version for p in seen.values()} == {version}
    assert {p.label for p in seen.values()} == {"b"}
    served = metrics.registry.get_sample_value("loraloop_requests_served_total", {"adapter_version": version})
    assert served >= len(ids)


def test_unreachable_redis_request_log_keeps_the_worker_serving(redis_server, redis_url: str, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    base = save_tiny_base_model(tmp_path / "base")
    # Redis holds the request log; the pointer stays in a file so that only the log is affected.
    settings = Settings(base_model=str(base), registry_url=str(tmp_path / "registry"), registry_pointer="file",
                        redis_url=redis_url, label_capacity=8, adapter_poll_s=0.05, max_batch=8, max_wait_ms=2)
    _promote_constant(settings, tmp_path, favoured="c")
    transport = MemoryTransport(MemoryBroker(partitions=2))
    metrics = Metrics(CollectorRegistry())
    log = make_request_log(settings)
    producer = transport.producer()
    with build_worker(settings, transport=transport, request_log=log, metrics=metrics) as worker:
        producer.send(settings.requests_topic, Request(id="up", text="hello").to_bytes())
        deadline = time.monotonic() + 20
        while log.get("up") is None:
            assert time.monotonic() < deadline, "the first request never reached the Redis request log"
            worker.run_once()
        redis_server.stop()
        try:
            ids = [f"down-{i}" for i in range(20)]
            for i in ids:
                producer.send(settings.requests_topic, Request(id=i, text="hello again").to_bytes())
            with caplog.at_level(logging.ERROR, logger="services.worker"):
                served = lambda: metrics.registry.get_sample_value(  # noqa: E731
                    "loraloop_requests_served_total", {"adapter_version": worker.active_version}) or 0
                while served() < 21:
                    assert time.monotonic() < deadline + 20, "the worker stopped serving without Redis"
                    worker.run_once()
        finally:
            redis_server.start()
    assert metrics.registry.get_sample_value("loraloop_request_log_errors_total") == 20
    assert any("request log unavailable" in r.getMessage() for r in caplog.records)
    broker = transport.broker
    preds = [Prediction.model_validate_json(r.value) for p in range(2)
             for r in broker.read(TopicPartition(settings.predictions_topic, p), 0, 10**6)]
    assert {p.request_id for p in preds} == {"up", *ids}
