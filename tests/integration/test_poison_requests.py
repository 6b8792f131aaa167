"""Poison requests among real traffic on a real Kafka: one dead letter each, everything else answered.

Before the per-record error boundaries, one request with a lone surrogate in its text or
tenant, or a 50k-deep JSON array, killed the worker that read it; its partition moved to
the other worker, which died on the same uncommitted record. Here two workers in one group
serve two partitions holding 1,000 requests, of which one of each poison kind: every other
request gets its prediction, each poison one dead letter with its reason, no worker thread
exits, and the poisons' offsets are committed (a fresh worker finds nothing left to serve).
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from loraloop.metrics import Metrics
from loraloop.model import load_base, load_tokenizer
from loraloop.registry import make_registry
from loraloop.schemas import DeadLetter, Prediction, Request
from loraloop.settings import Settings
from loraloop.testing import build_constant_adapter, save_tiny_base_model
from loraloop.transport import TransportError, make_transport
from services.worker import InferenceWorker, build_worker
from tests.test_worker_memory import _PoisonTokenizer

pytestmark = pytest.mark.integration
torch.set_num_threads(1)

TOTAL = 1000
INFERENCE_POISON = "this text makes the tokenizer raise"
# Each poison as raw bytes, with the dead-letter reason it must get.
POISONS: dict[str, tuple[bytes, str]] = {
    "surrogate_text": (b'{"id": "poison-text", "text": "lone \\ud800 surrogate"}', "invalid_unicode"),
    "surrogate_tenant": (b'{"id": "poison-tenant", "text": "fine text", "tenant": "\\udfff"}', "invalid_unicode"),
    "deep_array": (b"[" * 50_000 + b"]" * 50_000, "too_deep"),
    "huge_int": (b'{"id": "poison-int", "text": "x", "ts": ' + b"9" * 5000 + b"}", "malformed_json"),
    "inference": (Request(id="poison-inference", text=INFERENCE_POISON).to_bytes(), "inference_error"),
}


def _read(settings: Settings, topic: str, done, timeout: float) -> list[bytes]:
    """Every record of ``topic`` from the start, until ``done(values)`` or ``timeout``."""
    values: list[bytes] = []
    with make_transport(settings).consumer([topic], f"reader-{uuid.uuid4().hex[:6]}") as consumer:
        deadline = time.monotonic() + timeout
        while not done(values) and time.monotonic() < deadline:
            try:
                values.extend(r.value for r in consumer.poll(timeout_ms=500, max_records=500))
            except TransportError:
                time.sleep(0.5)
    return values


def _start(worker: InferenceWorker, name: str) -> tuple[threading.Thread, threading.Event]:
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), name=name, daemon=True)
    thread.start()
    return thread, stop


def test_one_poison_of_each_kind_among_1000_requests_on_two_workers(kafka_broker, kafka_settings,
                                                                   tmp_path: Path) -> None:
    base = save_tiny_base_model(tmp_path / "base")
    settings = kafka_settings(base_model=str(base), registry_url=str(tmp_path / "registry"), label_capacity=8,
                              adapter_poll_s=0.1, max_batch=16, max_wait_ms=5, max_tokens=16)
    for topic in (settings.requests_topic, settings.predictions_topic, settings.dead_letter_topic):
        kafka_broker.create_topic(topic, 2)
    registry = make_registry(settings)
    folder = build_constant_adapter(settings, ["a", "b", "c"], "b", tmp_path / "adapter", base=load_base(settings))
    version = registry.promote(registry.publish(folder)).version

    metrics = [Metrics(CollectorRegistry()), Metrics(CollectorRegistry())]
    # one tokenizer each: a fast tokenizer's truncation settings are not safe to share between threads
    workers = [build_worker(settings, metrics=m, tokenizer=_PoisonTokenizer(load_tokenizer(settings), INFERENCE_POISON))
               for m in metrics]
    running: list[tuple[threading.Thread, threading.Event]] = []
    producer = make_transport(settings).producer()
    try:
        deadline = time.monotonic() + 60
        for i, worker in enumerate(workers):
            # One after the other: PEFT's low_cpu_mem_usage install patches torch globally, so two workers
            # installing at once in one process (never the case in production: one per process) can
            # leave one with meta tensors.
            running.append(_start(worker, f"worker-{i}"))
            while worker.active_version != version:
                assert time.monotonic() < deadline, f"worker {i} never served {version}"
                time.sleep(0.05)
        while not all(w._consumer is not None and w._consumer.assignment() for w in workers):
            assert time.monotonic() < deadline, "the two workers never shared the partitions"
            time.sleep(0.2)
        assert {len(w._consumer.assignment()) for w in workers} == {1}  # one partition each

        n_valid = TOTAL - len(POISONS)
        ids = [f"req-{i:04d}" for i in range(n_valid)]
        every = n_valid // (len(POISONS) + 1)
        poison_at = {every * (k + 1): name for k, name in enumerate(POISONS)}  # spread through the stream
        poison_partition: dict[str, int] = {}
        for i, request_id in enumerate(ids):
            if i in poison_at:
                name = poison_at[i]
                partition, _ = producer.send(settings.requests_topic, POISONS[name][0],
                                             key=name.encode()).get(timeout=30)
                poison_partition[name] = partition
            producer.send(settings.requests_topic, Request(id=request_id, text=f"where is my card {i}").to_bytes(),
                          key=request_id.encode())
        producer.flush(timeout=30)

        predictions = [Prediction.model_validate_json(v) for v in _read(
            settings, settings.predictions_topic,
            lambda vs: len({Prediction.model_validate_json(v).request_id for v in vs}) >= n_valid, timeout=120)]
        letters = [DeadLetter.model_validate_json(v) for v in _read(
            settings, settings.dead_letter_topic, lambda vs: len(vs) >= len(POISONS), timeout=60)]
        alive = [thread.is_alive() for thread, _ in running]
    finally:
        producer.close()
        for _, stop in running:
            stop.set()
        for thread, _ in running:
            thread.join(timeout=60)

    assert alive == [True, True], "a worker thread exited"
    answered = {p.request_id for p in predictions}
    assert answered == set(ids), f"{len(set(ids) - answered)} unanswered, e.g. {sorted(set(ids) - answered)[:5]}"
    assert len(answered) == TOTAL - len(POISONS)
    assert {p.adapter_version for p in predictions} == {version} and {p.label for p in predictions} == {"b"}
    by_position = {(d.partition, d.offset): d for d in letters}  # a redelivered batch may repeat a letter
    assert len(by_position) == len(POISONS)
    assert sorted(d.reason for d in by_position.values()) == sorted(reason for _, reason in POISONS.values())
    for name, (raw, _) in POISONS.items():  # each letter points at its poison's partition
        [letter] = [d for d in by_position.values() if d.payload_bytes == len(raw)]
        assert letter.partition == poison_partition[name] and letter.reason == POISONS[name][1]
    served = [m.registry.get_sample_value("loraloop_requests_served_total", {"adapter_version": version}) or 0
              for m in metrics]
    assert all(n > 0 for n in served), f"both workers serve: {served}"
    assert sum(m.registry.get_sample_value("loraloop_worker_loop_errors_total") for m in metrics) == 0

    # Every offset was committed, the poisons' included: a fresh member of the group has nothing to serve.
    fresh = build_worker(settings, metrics=Metrics(CollectorRegistry()))
    handled = 0
    try:
        deadline = time.monotonic() + 30
        while fresh._consumer is None or not fresh._consumer.assignment():
            assert time.monotonic() < deadline, "the fresh worker never joined the group"
            handled += fresh.run_once()
        handled += sum(fresh.run_once() for _ in range(10))
    finally:
        fresh.close()
    assert handled == 0, f"{handled} records were not committed"
