"""The active pointer with a real Redis: the file is the truth, Redis a copy and a notification channel.

Redis losing its data (FLUSHALL, then a restart: what a Redis without persistence does when
it is killed), Redis down while promoting, and a raw ``SET`` + ``PUBLISH`` by anyone who can
reach an unprotected Redis: none of them changes what the registry, or a worker, reports as active.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import redis
import torch

from loraloop.registry import AdapterRegistry, make_registry, pointer_key
from loraloop.settings import Settings
from loraloop.testing import build_constant_adapter
from tests.infra import RedisServer
from tests.test_worker_memory import Stack, swap_to

pytestmark = pytest.mark.integration
torch.set_num_threads(1)
LABELS = ["a", "b", "c"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, base_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    settings = Settings(base_model=str(base_dir), label_capacity=8)
    return {label: build_constant_adapter(settings, LABELS, label, root / label, seed=i)
            for i, label in enumerate(LABELS)}


def _settings(tmp_path: Path, redis_url: str) -> Settings:
    return Settings(registry_url=str(tmp_path / "registry"), registry_pointer="redis", redis_url=redis_url,
                    label_capacity=8, adapter_poll_s=0.1)


def _lose_everything(server: RedisServer) -> None:
    """Redis loses its whole data set and restarts: FLUSHALL is in the AOF, so the restart comes back empty."""
    client = redis.Redis.from_url(server.url)
    try:
        client.flushall()
    finally:
        client.close()
    server.restart()


def test_pointer_and_history_survive_redis_losing_its_data(tmp_path: Path, redis_server: RedisServer,
                                                           redis_url: str, adapters: dict[str, Path]) -> None:
    settings = _settings(tmp_path, redis_url)
    registry = make_registry(settings)
    v1, v2, v3 = (registry.publish(adapters[label]) for label in LABELS)
    for v in (v1, v2, v3):
        registry.promote(v, reason=f"to {v}")
    before = registry.active()
    assert (before.version, before.generation, before.history) == (v3, 3, (v1, v2))
    raw = redis.Redis.from_url(redis_url)
    key = pointer_key(settings.registry_url)
    assert json.loads(raw.get(key))["version"] == v3  # the Redis copy is written through

    _lose_everything(redis_server)
    assert raw.get(key) is None  # Redis really lost it
    fresh = make_registry(settings)
    assert fresh.active() == before  # nothing lost: the file is the truth
    fresh.wait_for_change(before.generation, timeout=0.2)
    assert json.loads(raw.get(key)) == json.loads(before.to_json())  # a watcher refilled the copy
    back = fresh.rollback(reason="after the restart")
    assert (back.version, back.generation, back.history) == (v2, 4, (v1,))
    v4 = fresh.publish(adapters["a"])
    assert int(v4[1:7]) == 4  # the version sequence survived too
    raw.close()


def test_promotes_while_redis_is_down_reach_watchers_by_polling(tmp_path: Path, redis_server: RedisServer,
                                                                 redis_url: str, adapters: dict[str, Path]) -> None:
    settings = _settings(tmp_path, redis_url)
    promoter, watcher = make_registry(settings), make_registry(settings)
    v1, v2 = promoter.publish(adapters["a"]), promoter.publish(adapters["b"])
    promoter.promote(v1)
    redis_server.stop()
    try:
        seen: dict[str, object] = {}

        def wait() -> None:
            seen["pointer"] = watcher.wait_for_change(1, timeout=10)
            seen["at"] = time.monotonic()

        thread = threading.Thread(target=wait)
        thread.start()
        time.sleep(0.3)
        promoted_at = time.monotonic()
        assert promoter.promote(v2, reason="redis is down").version == v2  # the file takes the change
        thread.join(15)
        assert seen["pointer"].version == v2  # type: ignore[union-attr]
        assert seen["at"] - promoted_at < 3.0  # type: ignore[operator]
    finally:
        redis_server.start()
    assert make_registry(settings).active().version == v2


def _forge(redis_url: str, registry: AdapterRegistry, key: str, version: str) -> None:
    """What anyone who reaches Redis can do: write a pointer naming ``version`` and announce it."""
    forged = replace(registry.active(), version=version, generation=registry.active().generation + 1)
    raw = redis.Redis.from_url(redis_url)
    try:
        raw.set(key, forged.to_json())
        raw.publish(f"{key}:changes", str(forged.generation))
    finally:
        raw.close()


def test_a_raw_set_and_publish_does_not_change_the_active_version(tmp_path: Path, redis_url: str,
                                                                   adapters: dict[str, Path]) -> None:
    settings = _settings(tmp_path, redis_url)
    registry = make_registry(settings)
    good = registry.promote(registry.publish(adapters["a"])).version
    rejected = registry.publish(adapters["b"])
    registry.mark_rejected(rejected, {"reason": "gate"})
    key = pointer_key(settings.registry_url)
    before = registry.active()

    result: dict[str, object] = {}
    thread = threading.Thread(target=lambda: result.update(p=registry.wait_for_change(before.generation, 1.5)))
    thread.start()
    time.sleep(0.3)
    _forge(redis_url, registry, key, rejected)
    thread.join(5)
    assert result["p"] == before  # woken, but the file did not change: still waiting, then timed out
    assert make_registry(settings).active() == before
    raw = redis.Redis.from_url(redis_url)
    assert json.loads(raw.get(key)) == json.loads(before.to_json())  # the forged copy was overwritten
    raw.close()
    assert registry.active().version == good


def test_a_worker_ignores_a_forged_pointer_and_follows_a_real_promote(tmp_path: Path, base_dir: Path,
                                                                       redis_url: str) -> None:
    stack = Stack(tmp_path, base_dir, redis_url=redis_url, registry_pointer="redis")
    good = stack.registry.promote(stack.publish(LABELS, "a")).version
    rejected = stack.publish(LABELS, "b")
    later = stack.publish(LABELS, "c")
    key = pointer_key(stack.settings.registry_url)
    with stack.worker() as worker:
        swap_to(worker, good)
        _forge(redis_url, stack.registry, key, rejected)
        deadline = time.monotonic() + 2.0  # the forged pointer was served within 0.21 s
        while time.monotonic() < deadline:
            worker.run_once()
        assert worker.active_version == good
        stack.registry.promote(later)
        swap_to(worker, later)  # the real channel still works


def test_a_redis_only_pointer_of_an_older_release_is_adopted_once(tmp_path: Path, redis_url: str,
                                                                  adapters: dict[str, Path],
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from loraloop.cli import main
    from loraloop.registry import ActivePointer

    settings = _settings(tmp_path, redis_url)
    registry = make_registry(settings)
    v1, v2 = registry.publish(adapters["a"]), registry.publish(adapters["b"])
    root = Path(registry.root)
    for name in ("pointer.json", "pointer.json.last-good"):
        (root / name).unlink()  # as an older release left it: the pointer only in Redis
    old = ActivePointer(version=v2, generation=7, history=(v1,), reason="old release", sequence=2)
    raw = redis.Redis.from_url(redis_url)
    raw.set(pointer_key(settings.registry_url), old.to_json())
    raw.close()
    assert registry.active().version is None  # never trusted implicitly
    argv = ["adapters", "adopt-redis-pointer", "--registry-url", settings.registry_url, "--registry-pointer", "redis",
            "--redis-url", redis_url, "--label-capacity", "8"]
    assert main(argv) == 0
    assert f"active: {v2} (generation 7)" in capsys.readouterr().out
    assert registry.active() == old
    assert main(argv) == 1
    assert "already exists and is the source of truth" in capsys.readouterr().err


def test_an_object_store_pointer_is_locked_through_redis(redis_server: RedisServer, redis_url: str,
                                                         adapters: dict[str, Path]) -> None:
    """No flock on an object store: Redis serializes writers across hosts, and no lock means no change."""
    import uuid

    from loraloop.registry import RegistryError

    settings = Settings(registry_url=f"memory://objstore-{uuid.uuid4().hex[:8]}/registry", registry_pointer="redis",
                        redis_url=redis_url, label_capacity=8)
    registry = make_registry(settings)
    v1, v2 = registry.publish(adapters["a"]), registry.publish(adapters["b"])
    registry.promote(v1)
    raw = redis.Redis.from_url(redis_url)
    held = raw.lock(f"{pointer_key(settings.registry_url)}:lock", timeout=5)
    assert held.acquire(blocking=False)
    registry.pointer.lock_timeout_s = 0.5
    with pytest.raises(RegistryError, match="still held after 0.5 s"):
        registry.promote(v2)
    held.release()
    raw.close()
    assert registry.promote(v2).version == v2
    redis_server.stop()
    try:
        with pytest.raises(RegistryError, match="cannot lock the pointer .* through Redis"):
            registry.rollback()
        assert registry.active().version == v2  # reads need no Redis
    finally:
        redis_server.start()
