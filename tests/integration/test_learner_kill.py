"""A learner killed with SIGKILL in the middle of training: registry unchanged, its claimed events come back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loraloop.buffer import make_feedback_buffer
from loraloop.registry import make_registry
from loraloop.schemas import Example
from loraloop.settings import Settings
from loraloop.testing import build_constant_adapter, save_tiny_base_model

pytestmark = pytest.mark.integration


def test_sigkill_during_training_loses_nothing(redis_url: str, tmp_path: Path) -> None:
    base_dir = save_tiny_base_model(tmp_path / "base")
    settings = Settings(base_model=str(base_dir), registry_url=str(tmp_path / "registry"), redis_url=redis_url,
                        label_capacity=8, claim_idle_s=2.0, epochs=3000)  # epochs: training lasts long enough to kill
    registry = make_registry(settings)
    first = registry.publish(build_constant_adapter(settings, ["a", "b"], "a", tmp_path / "adapter"))
    registry.promote(first)
    buffer = make_feedback_buffer(settings)
    for i in range(30):
        buffer.append(Example(event_id=f"e{i}", request_id=f"r{i}", text=f"moon star {i}", kind="label", label="c",
                              served_label="a", adapter_version=first))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORALOOP_")}
    env.update({"LORALOOP_BASE_MODEL": str(base_dir), "LORALOOP_REGISTRY_URL": settings.registry_url,
                "LORALOOP_REDIS_URL": redis_url, "LORALOOP_LABEL_CAPACITY": "8", "LORALOOP_EPOCHS": "3000",
                "LORALOOP_CLAIM_IDLE_S": "2", "LORALOOP_TORCH_THREADS": "1"})
    log = open(tmp_path / "learner.log", "w")  # noqa: SIM115
    learner = subprocess.Popen([sys.executable, "-m", "loraloop.cli", "learner", "--once"], env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while buffer.pending() > 0:  # claimed: the cycle has started
            assert learner.poll() is None and time.monotonic() < deadline, (tmp_path / "learner.log").read_text()
            time.sleep(0.1)
        time.sleep(1)  # into training (3000 epochs)
        assert learner.poll() is None, "the cycle ended before it could be killed"
        os.kill(learner.pid, signal.SIGKILL)
        learner.wait(timeout=10)
    finally:
        if learner.poll() is None:
            learner.kill()
        log.close()
    assert registry.active().version == first
    assert [v.version for v in registry.versions()] == [first]
    assert buffer.depth() == 30
    time.sleep(2.5)  # claim_idle_s
    again = buffer.claim("next-learner", 100)
    assert sorted(e.event_id for e in again.examples) == sorted(f"e{i}" for i in range(30))
