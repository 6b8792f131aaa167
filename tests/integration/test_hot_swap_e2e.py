"""Key end-to-end test: two worker processes, real Kafka and Redis, 20 promotions and rollbacks.

Two ``loraloop worker`` processes in one consumer group serve a steady stream of
requests while this test promotes and rolls back adapters 20 times (active pointer in
Redis, so workers hear of each change by pub/sub). Every adapter predicts its own label
(``build_constant_adapter``), so each prediction says which adapter really served it.

Checked: every request gets a prediction (none lost), the label of every prediction is
the one its ``adapter_version`` predicts, and that version was active no more than 2 s
before the prediction was produced (``Prediction.ts``) by the promoting side's log.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from loraloop.model import load_base
from loraloop.registry import make_registry
from loraloop.schemas import Prediction, Request
from loraloop.settings import Settings
from loraloop.testing import build_constant_adapter, save_tiny_base_model
from loraloop.transport import TransportError, make_transport
from tests.infra import free_port, http_status

pytestmark = pytest.mark.integration

SWAPS = 20
SWAP_EVERY_S = 2.0
REQUEST_EVERY_S = 0.02  # ~50 requests/s, steady
MAX_STALENESS_S = 2.0
LABELS = ["l0", "l1", "l2", "l3"]


def _env(settings: Settings, metrics_port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORALOOP_")}
    for name in ("transport", "kafka_bootstrap", "kafka_api_version", "requests_topic", "predictions_topic",
                 "dead_letter_topic", "worker_group", "redis_url", "registry_url", "base_model", "label_capacity",
                 "max_batch", "max_wait_ms", "adapter_poll_s"):
        env[f"LORALOOP_{name.upper()}"] = str(getattr(settings, name))
    env["LORALOOP_TORCH_THREADS"] = "1"
    env["LORALOOP_METRICS_PORT"] = str(metrics_port)
    return env




def _metric(port: int, line_prefix: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(line_prefix):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


class _Reader(threading.Thread):
    """Reads the predictions topic into a dict (the last copy of a repeated prediction wins)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(name="prediction-reader", daemon=True)
        self.settings = settings
        self.stop = threading.Event()
        self.seen: dict[str, Prediction] = {}
        self.copies = 0

    def run(self) -> None:
        transport = make_transport(self.settings)
        with transport.consumer([self.settings.predictions_topic], f"reader-{uuid.uuid4().hex[:6]}") as consumer:
            while not self.stop.is_set():
                try:
                    records = consumer.poll(timeout_ms=200, max_records=1000)
                except TransportError:
                    time.sleep(0.2)
                    continue
                for r in records:
                    p = Prediction.model_validate_json(r.value)
                    self.copies += 1
                    self.seen[p.request_id] = p


def test_two_workers_hot_swap_20_times_without_losing_or_mislabelling(kafka_broker, kafka_settings, redis_url,
                                                                     tmp_path: Path) -> None:
    base_dir = save_tiny_base_model(tmp_path / "base")
    settings = kafka_settings(base_model=str(base_dir), registry_url=str(tmp_path / "registry"), redis_url=redis_url,
                              label_capacity=8, max_batch=16, max_wait_ms=5, adapter_poll_s=0.5)
    for topic in (settings.requests_topic, settings.predictions_topic):
        kafka_broker.create_topic(topic, 4)
    registry = make_registry(settings)
    assert type(registry.pointer).__name__ == "RedisPointerStore"  # workers hear changes by pub/sub
    base = load_base(settings)
    favoured: dict[str, str] = {}
    for i, label in enumerate(LABELS):
        folder = build_constant_adapter(settings, LABELS, label, tmp_path / f"adapter-{label}", base=base, seed=i)
        favoured[registry.publish(folder)] = label
    versions = list(favoured)
    active_log: list[tuple[float, str]] = []  # (time just before the change was made, version)
    active_log.append((time.time(), registry.promote(versions[0], reason="initial").version))

    ports = [free_port(), free_port()]
    logs = [open(tmp_path / f"worker-{i}.log", "w") for i in range(2)]  # noqa: SIM115
    workers = [subprocess.Popen([sys.executable, "-m", "loraloop.cli", "worker"], env=_env(settings, port),
                                stdout=log, stderr=subprocess.STDOUT) for port, log in zip(ports, logs, strict=True)]
    reader = _Reader(settings)
    sent: list[str] = []
    stop_sending = threading.Event()

    def send() -> None:
        producer = make_transport(settings).producer()
        n = 0
        while not stop_sending.is_set():
            request_id = f"req-{n:05d}"
            producer.send(settings.requests_topic, Request(id=request_id, text=f"card question {n}").to_bytes(),
                          key=request_id.encode())
            sent.append(request_id)
            n += 1
            time.sleep(REQUEST_EVERY_S)
        producer.flush(timeout=30)
        producer.close()

    sender = threading.Thread(target=send, name="sender")
    try:
        deadline = time.monotonic() + 90
        while not all(http_status(f"http://127.0.0.1:{p}/readyz") == 200 for p in ports):
            assert all(w.poll() is None for w in workers), "a worker exited during start-up"
            assert time.monotonic() < deadline, "workers not ready after 90 s"
            time.sleep(0.5)
        reader.start()
        sender.start()
        time.sleep(SWAP_EVERY_S)
        k = 1
        for i in range(SWAPS):
            time.sleep(SWAP_EVERY_S)
            before = time.time()
            if i % 3 == 2:
                pointer = registry.rollback(reason="e2e")
            else:
                current = registry.active().version
                target = versions[k % len(versions)]
                if target == current:
                    k += 1
                    target = versions[k % len(versions)]
                k += 1
                pointer = registry.promote(target, reason="e2e")
            active_log.append((before, pointer.version))
        time.sleep(SWAP_EVERY_S)
        stop_sending.set()
        sender.join(timeout=60)
        deadline = time.monotonic() + 60
        while set(sent) - set(reader.seen) and time.monotonic() < deadline:
            time.sleep(0.2)
        swaps_ok = [_metric(p, 'loraloop_adapter_swaps_total{outcome="ok"}') for p in ports]
        swaps_failed = [_metric(p, 'loraloop_adapter_swaps_total{outcome="failed"}') for p in ports]
        served = [_metric(p, "loraloop_requests_served_total") for p in ports]
    finally:
        stop_sending.set()
        reader.stop.set()
        for w in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        codes = []
        for w in workers:
            try:
                codes.append(w.wait(timeout=30))
            except subprocess.TimeoutExpired:
                w.kill()
                codes.append("killed")
        for log in logs:
            log.close()

    def explain() -> str:
        return "\n".join(f"--- worker {i} ---\n" + "\n".join((tmp_path / f"worker-{i}.log").read_text().splitlines()
                                                              [-40:]) for i in range(2))

    assert codes == [0, 0], explain()  # SIGTERM: finish the batch, commit, leave, exit 0
    missing = sorted(set(sent) - set(reader.seen))
    assert len(sent) > 1000 and not missing, f"{len(missing)} of {len(sent)} requests lost, e.g. {missing[:5]}"
    assert swaps_failed == [0.0, 0.0] and all(s >= SWAPS for s in swaps_ok), (swaps_ok, swaps_failed)
    assert all(s > 0 for s in served), f"both workers serve their partitions: {served}"

    # Intervals during which each version was (possibly) active: from just before the change
    # that made it active to just before the next change, plus the allowed staleness.
    intervals: dict[str, list[tuple[float, float]]] = {}
    for j, (start, version) in enumerate(active_log):
        end = active_log[j + 1][0] if j + 1 < len(active_log) else float("inf")
        intervals.setdefault(version, []).append((start, end))
    wrong_label, stale = [], []
    for p in reader.seen.values():
        if p.label != favoured[p.adapter_version]:
            wrong_label.append(p)
        if not any(start <= p.ts <= end + MAX_STALENESS_S for start, end in intervals[p.adapter_version]):
            stale.append(p)
    assert not wrong_label, f"{len(wrong_label)} predictions disagree with their adapter, e.g. {wrong_label[0]}"
    assert not stale, f"{len(stale)} predictions by a version inactive for > {MAX_STALENESS_S} s, e.g. {stale[0]}"
    assert {p.adapter_version for p in reader.seen.values()} == set(versions)
