"""The learning loop across processes on real Kafka and Redis.

Three processes, as an ops team runs them: ``loraloop worker``, ``loraloop feedback run``
and ``loraloop learner`` (bootstrapped on labels ``a`` and ``b``). Requests of a label the
first adapter does not know (``c``) are served, users correct them, the ingester joins the
corrections to the request log in Redis, the learner trains on them, and the worker,
never restarted, serves ``c`` for such requests after one promotion. ``loraloop retrain
--wait`` then reaches the running learner from a fourth process.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from loraloop.registry import make_registry
from loraloop.schemas import FeedbackEvent, Prediction, Request
from loraloop.settings import Settings
from loraloop.testing import save_tiny_base_model
from loraloop.transport import make_transport

pytestmark = pytest.mark.integration

WORDS = {"a": "apple banana fruit pear", "b": "car truck wheel engine", "c": "moon star planet comet"}
SHARED = ("transport", "kafka_bootstrap", "kafka_api_version", "requests_topic", "predictions_topic",
          "feedback_topic", "dead_letter_topic", "worker_group", "ingester_group", "redis_url", "registry_url",
          "base_model", "label_capacity", "max_batch", "max_wait_ms", "adapter_poll_s", "cycle_min_feedback",
          "cycle_interval_s", "epochs", "feedback_grace_s")


def _env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORALOOP_")}
    env.update({f"LORALOOP_{name.upper()}": str(getattr(settings, name)) for name in SHARED})
    env["LORALOOP_TORCH_THREADS"] = "1"
    return env


def _text(rng: random.Random, label: str) -> str:
    return " ".join(rng.choice(WORDS[label].split()) for _ in range(4))


def _serve(settings: Settings, texts: list[str], timeout_s: float = 60) -> dict[str, Prediction]:
    """Send requests, return their predictions by request id."""
    transport = make_transport(settings)
    ids = [f"req-{uuid.uuid4().hex[:10]}" for _ in texts]
    with transport.consumer([settings.predictions_topic], f"reader-{uuid.uuid4().hex[:6]}") as consumer:
        consumer.poll(timeout_ms=500, max_records=1)  # join before producing
        producer = transport.producer()
        for request_id, text in zip(ids, texts, strict=True):
            producer.send(settings.requests_topic, Request(id=request_id, text=text).to_bytes(), key=request_id.encode())
        producer.flush(timeout=30)
        producer.close()
        seen: dict[str, Prediction] = {}
        deadline = time.monotonic() + timeout_s
        while set(ids) - set(seen) and time.monotonic() < deadline:
            for record in consumer.poll(timeout_ms=200, max_records=500):
                p = Prediction.model_validate_json(record.value)
                seen[p.request_id] = p
    missing = set(ids) - set(seen)
    assert not missing, f"{len(missing)} of {len(ids)} requests got no prediction"
    return {i: seen[i] for i in ids}


def test_a_new_label_becomes_servable_across_processes(kafka_broker, kafka_settings, redis_url, tmp_path: Path) -> None:
    base_dir = save_tiny_base_model(tmp_path / "base")
    settings = kafka_settings(base_model=str(base_dir), registry_url=str(tmp_path / "registry"), redis_url=redis_url,
                              label_capacity=8, max_batch=16, max_wait_ms=5, adapter_poll_s=0.5,
                              cycle_min_feedback=60, cycle_interval_s=3600, epochs=1, feedback_grace_s=5)
    for topic in (settings.requests_topic, settings.predictions_topic, settings.feedback_topic):
        kafka_broker.create_topic(topic, 2)
    rng = random.Random(0)
    boot = tmp_path / "boot.csv"
    boot.write_text("text,label\n" + "".join(f"{_text(rng, y)},{y}\n" for y in "ab" * 30))
    env = _env(settings)
    cli = [sys.executable, "-m", "loraloop.cli"]
    commands = {"learner": cli + ["learner", "--bootstrap", str(boot)], "worker": cli + ["worker"],
                "ingester": cli + ["feedback", "run"]}
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in commands}  # noqa: SIM115
    procs: dict[str, subprocess.Popen] = {}
    registry = make_registry(settings)

    def explain() -> str:
        return "\n".join(f"--- {n} ---\n" + "\n".join((tmp_path / f"{n}.log").read_text().splitlines()[-30:])
                         for n in commands)

    try:
        procs["learner"] = subprocess.Popen(commands["learner"], env=env, stdout=logs["learner"],
                                            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not registry.active().version:
            assert procs["learner"].poll() is None and time.monotonic() < deadline, explain()
            time.sleep(0.5)
        first = registry.active().version
        for name in ("worker", "ingester"):
            procs[name] = subprocess.Popen(commands[name], env=env, stdout=logs[name], stderr=subprocess.STDOUT)

        served = _serve(settings, [_text(rng, "c") for _ in range(80)], timeout_s=120)
        assert {p.label for p in served.values()} <= {"a", "b"} and {p.adapter_version for p in served.values()} == {first}
        producer = make_transport(settings).producer()
        for request_id in served:  # users correct every prediction: the right answer was "c"
            event = FeedbackEvent(event_id=uuid.uuid4().hex, request_id=request_id, kind="label", label="c")
            producer.send(settings.feedback_topic, event.to_bytes(), key=request_id.encode())
        producer.flush(timeout=30)
        producer.close()

        deadline = time.monotonic() + 180
        while registry.active().version == first:
            assert all(p.poll() is None for p in procs.values()) and time.monotonic() < deadline, explain()
            time.sleep(0.5)
        second = registry.active().version
        assert registry.cycles()[-1]["outcome"] == "promoted" and "c" in registry.cycles()[-1]["new_labels"]
        time.sleep(3)  # the promotion reaches the worker within 2 s
        after = _serve(settings, [_text(rng, "c") for _ in range(40)])
        assert {p.adapter_version for p in after.values()} == {second}, explain()
        share_c = sum(p.label == "c" for p in after.values()) / len(after)
        assert share_c >= 0.9, f"only {share_c:.0%} of new-label requests served as 'c'\n{explain()}"

        retrain = subprocess.run(cli + ["retrain", "--wait", "60"], env=env, capture_output=True, text=True,
                                 timeout=90)
        assert retrain.returncode == 0 and "cycle empty" in retrain.stdout, retrain.stdout + retrain.stderr
        assert all(p.poll() is None for p in procs.values()), "no process restarted or died\n" + explain()
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        for log in logs.values():
            log.close()
