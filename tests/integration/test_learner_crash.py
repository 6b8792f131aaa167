"""SIGKILL of a real learner process right after publish, promote, record and acknowledge (Redis buffer).

The learner kills itself at the named step (``LORALOOP_LEARNER_KILL_AT``: the same SIGKILL an
OOM killer or a node loss sends, at an exact point instead of a lucky one); a second learner
process is then started on the same registry and Redis. Each claim must be trained once, the
promoted version must have exactly one cycle record, no version may be left listed ``ok``,
and the claimed examples must end acknowledged and in the replay reservoir.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from learner.journal import FAULT_ENV, STEPS
from loraloop.buffer import make_feedback_buffer
from loraloop.registry import make_registry
from loraloop.schemas import Example
from loraloop.settings import Settings
from loraloop.testing import build_constant_adapter, save_tiny_base_model

pytestmark = pytest.mark.integration
IDLE_S = 1.5


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_base_model(tmp_path_factory.mktemp("tiny") / "base")


def _learner(env: dict, log: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = dict(env)
    if kill_at:
        env[FAULT_ENV] = kill_at
    with open(log, "a") as out:
        return subprocess.run([sys.executable, "-m", "loraloop.cli", "learner", "--once"], env=env, stdout=out,
                              stderr=subprocess.STDOUT, timeout=180)


@pytest.mark.parametrize("kill_at", STEPS)
def test_sigkill_after_each_step_trains_each_claim_once(redis_url: str, tmp_path: Path, base_dir: Path,
                                                        kill_at: str) -> None:
    settings = Settings(base_model=str(base_dir), registry_url=str(tmp_path / "registry"), redis_url=redis_url,
                        label_capacity=8, claim_idle_s=IDLE_S, epochs=1)
    registry = make_registry(settings)
    first = registry.publish(build_constant_adapter(settings, ["a", "b"], "a", tmp_path / "adapter"))
    registry.promote(first)
    buffer = make_feedback_buffer(settings)
    ids = [f"e{i}" for i in range(30)]
    for i, event_id in enumerate(ids):
        buffer.append(Example(event_id=event_id, request_id=f"r{i}", text=f"moon star {i}", kind="label",
                              label="c", served_label="a", adapter_version=first))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORALOOP_")}
    env.update({"LORALOOP_BASE_MODEL": str(base_dir), "LORALOOP_REGISTRY_URL": settings.registry_url,
                "LORALOOP_REDIS_URL": redis_url, "LORALOOP_LABEL_CAPACITY": "8", "LORALOOP_EPOCHS": "1",
                "LORALOOP_CLAIM_IDLE_S": str(IDLE_S), "LORALOOP_TORCH_THREADS": "1",
                "LORALOOP_GATE_ENABLED": "false"})  # every candidate is promoted: the crash, not the gate, is tested
    log = tmp_path / "learner.log"

    killed = _learner(env, log, kill_at)
    assert killed.returncode == -signal.SIGKILL, log.read_text()
    assert f"killing the learner after {kill_at}" in log.read_text()
    assert len(registry.versions()) == 2  # published before every step named
    assert (registry.active().version != first) is (kill_at != "publish")
    assert len(registry.cycles()) == (1 if kill_at in ("record", "acknowledge") else 0)

    time.sleep(2 * IDLE_S + 0.5)  # the killed claim is handed out again (if it was not acknowledged)
    restarted = _learner(env, log)
    assert restarted.returncode == 0, log.read_text()

    versions = [v.version for v in registry.versions()]
    assert len(versions) == 2, f"trained and published again: {versions}"
    candidate = versions[1]
    assert registry.active().version == candidate
    assert {v.version: v.status.get("status", "ok") for v in registry.versions()}[candidate] == "promoted"
    promoted = [c for c in registry.cycles() if c["outcome"] == "promoted"]
    assert len(promoted) == 1 and promoted[0]["version"] == candidate and promoted[0]["duration_s"] > 0
    claim_ids = [c["claim_id"] for c in registry.cycles()]
    assert len(claim_ids) == len(set(claim_ids))  # one record per claim (the second run's own, if any, is empty)
    assert [c["outcome"] for c in registry.cycles() if c["claim_id"] != promoted[0]["claim_id"]] in ([], ["empty"])
    assert buffer.depth() == 0
    assert not list((Path(settings.registry_url) / "intents").glob("*")), "intent left open"
    assert set(ids) <= {e.event_id for e in buffer.replay_sample(10**6, seed=0)}


def test_a_drain_cycle_killed_mid_training_changes_nothing_and_its_claim_comes_back(redis_url: str, tmp_path: Path,
                                                                                   base_dir: Path) -> None:
    """The drain cycle (traffic paused, fewer examples than a count trigger needs) SIGKILLed while it trains."""
    import redis

    from loraloop.buffer.redis import GROUP

    settings = Settings(base_model=str(base_dir), registry_url=str(tmp_path / "registry"), redis_url=redis_url,
                        label_capacity=8, claim_idle_s=IDLE_S, epochs=1)
    registry = make_registry(settings)
    first = registry.publish(build_constant_adapter(settings, ["a", "b"], "a", tmp_path / "adapter"))
    registry.promote(first)
    buffer = make_feedback_buffer(settings)
    for i in range(30):
        buffer.append(Example(event_id=f"d{i}", request_id=f"r{i}", text=f"moon star {i}", kind="label",
                              label="c", served_label="a", adapter_version=first))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORALOOP_")}
    env.update({"LORALOOP_BASE_MODEL": str(base_dir), "LORALOOP_REGISTRY_URL": settings.registry_url,
                "LORALOOP_REDIS_URL": redis_url, "LORALOOP_LABEL_CAPACITY": "8", "LORALOOP_CLAIM_IDLE_S": str(IDLE_S),
                "LORALOOP_TORCH_THREADS": "1", "LORALOOP_GATE_ENABLED": "false",
                "LORALOOP_EPOCHS": "400",  # long enough a training to be killed in the middle of it
                "LORALOOP_CYCLE_MIN_FEEDBACK": "1000", "LORALOOP_CYCLE_INTERVAL_S": "3600",
                "LORALOOP_CYCLE_DRAIN_S": "1"})
    log = tmp_path / "learner.log"
    client = redis.Redis.from_url(redis_url)
    with open(log, "a") as out:
        learner = subprocess.Popen([sys.executable, "-m", "loraloop.cli", "learner"], env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while client.xpending(buffer.stream, GROUP)["pending"] < 30:  # the drain cycle has claimed them
            assert learner.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        time.sleep(0.3)  # into the training
        learner.send_signal(signal.SIGKILL)
        learner.wait(timeout=30)
    finally:
        if learner.poll() is None:
            learner.kill()
    # Only a drain cycle can have claimed them: 30 examples are below the count trigger, the timer is an hour away.
    assert [v.version for v in registry.versions()] == [first] and registry.active().version == first
    assert registry.cycles() == [] and buffer.depth() == 30  # registry unchanged, nothing acknowledged

    time.sleep(2 * IDLE_S + 0.5)
    env["LORALOOP_EPOCHS"] = "1"
    restarted = _learner(env, log)
    assert restarted.returncode == 0, log.read_text()
    cycles = registry.cycles()
    assert len(cycles) == 1 and cycles[0]["outcome"] == "promoted" and cycles[0]["examples"] == 30, cycles
    assert buffer.depth() == 0 and len(registry.versions()) == 2
