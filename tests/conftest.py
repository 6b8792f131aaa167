"""Shared fixtures: real Redis, Kafka and Prometheus servers, and settings that point at them.

The servers are session-scoped (Kafka takes seconds to start): tests share one of each and
keep apart through unique topic names, group ids and a flushed Redis. Integration fixtures
skip when a server is missing or does not start, except in CI (``LORALOOP_REQUIRE_INFRA=1``,
set by ``make test``), where that fails the test with the reason.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from loraloop.settings import Settings
from loraloop.testing import save_tiny_base_model
from tests.infra import InfraMissing, KafkaBroker, PrometheusServer, RedisServer, ServerDied

torch.set_num_threads(1)  # tests share two cores

if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
    # `timeout pytest ...` sends SIGTERM: turn it into KeyboardInterrupt so that pytest
    # still runs the session teardown that stops the servers.
    signal.signal(signal.SIGTERM, signal.default_int_handler)

_STARTUP_FAILURES = (InfraMissing, ServerDied, TimeoutError)


def _unavailable(reason: str) -> None:
    if os.environ.get("LORALOOP_REQUIRE_INFRA") == "1":
        pytest.fail(f"integration infrastructure required but unavailable: {reason}", pytrace=False)
    pytest.skip(f"integration infrastructure unavailable: {reason}")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server (``.url``, ``.restart()``, ``.stop()``, ``.start()``), data kept across restarts."""
    server = None
    try:
        server = RedisServer(tmp_path_factory.mktemp("redis"))
        server.start()
    except _STARTUP_FAILURES as e:
        if server is not None:
            server.stop()
        _unavailable(str(e))
    yield server
    server.stop()


@pytest.fixture()
def redis_url(redis_server: RedisServer) -> str:
    """URL of the session's Redis, emptied for this test (and started again if a test stopped it)."""
    import redis

    redis_server.start()
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server.url


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    """ZooKeeper + Kafka 0.9.0.1 (``.bootstrap``, ``.restart()``, ``.create_topic(name, partitions)``)."""
    broker = None
    try:
        broker = KafkaBroker(tmp_path_factory.mktemp("kafka"))
        broker.start()
    except _STARTUP_FAILURES as e:
        if broker is not None:
            broker.stop()
        _unavailable(str(e))
    yield broker
    broker.stop()


@pytest.fixture()
def kafka_settings(kafka_broker: KafkaBroker) -> Callable[..., Settings]:
    """``kafka_settings(**overrides)``: settings for the real broker, topics and groups unique to each call."""
    kafka_broker.start()  # no-op unless a test left the broker stopped

    def make(**overrides: object) -> Settings:
        tag = uuid.uuid4().hex[:8]
        values: dict[str, object] = {
            "transport": "kafka", "kafka_bootstrap": kafka_broker.bootstrap, "kafka_api_version": "0.9",
            "requests_topic": f"req-{tag}", "predictions_topic": f"pred-{tag}", "feedback_topic": f"fb-{tag}",
            "dead_letter_topic": f"dlq-{tag}", "worker_group": f"workers-{tag}", "ingester_group": f"ingest-{tag}",
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture(scope="session")
def prometheus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    """Prometheus, started by the test: ``prometheus_server.start(["127.0.0.1:PORT"], scrape_interval_s=1)``."""
    try:
        server = PrometheusServer(tmp_path_factory.mktemp("prometheus"))
    except InfraMissing as e:
        _unavailable(str(e))
    yield server
    server.stop()


@pytest.fixture()
def tmp_settings(tmp_path: Path) -> Callable[..., Settings]:
    """``tmp_settings(**overrides)``: embedded settings with the registry in this test's temporary folder."""

    def make(**overrides: object) -> Settings:
        return Settings(**{"registry_url": str(tmp_path / "registry"), **overrides})

    return make


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random base model saved once for the session (tests that publish and serve tiny adapters)."""
    return save_tiny_base_model(tmp_path_factory.mktemp("tiny") / "base")
