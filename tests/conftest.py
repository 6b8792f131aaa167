"""Shared fixtures: real Redis, Kafka and Prometheus servers, and settings that point at them.

Integration fixtures skip when a server binary is missing, except in CI
(``LORALOOP_REQUIRE_INFRA=1``, set by ``make test``), where a missing server fails.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from loraloop.settings import Settings
from tests.infra import InfraMissing, KafkaBroker, PrometheusServer, RedisServer

torch.set_num_threads(1)  # tests share two cores


def _unavailable(reason: str) -> None:
    if os.environ.get("LORALOOP_REQUIRE_INFRA") == "1":
        pytest.fail(f"integration infrastructure required but unavailable: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    try:
        server = RedisServer(tmp_path_factory.mktemp("redis"))
        server.start()
    except (InfraMissing, TimeoutError) as e:
        _unavailable(str(e))
    yield server
    server.stop()


@pytest.fixture()
def redis_url(redis_server: RedisServer) -> str:
    import redis

    redis.Redis.from_url(redis_server.url).flushall()  # every test starts from an empty Redis
    return redis_server.url


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    try:
        broker = KafkaBroker(tmp_path_factory.mktemp("kafka"))
        broker.start()
    except (InfraMissing, TimeoutError) as e:
        _unavailable(str(e))
    yield broker
    broker.stop()


@pytest.fixture()
def kafka_settings(kafka_broker: KafkaBroker) -> Callable[..., Settings]:
    """Settings for the real broker, with topic names and groups unique to each call."""

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
    try:
        server = PrometheusServer(tmp_path_factory.mktemp("prometheus"))
    except InfraMissing as e:
        _unavailable(str(e))
    yield server
    server.stop()


@pytest.fixture()
def tmp_settings(tmp_path: Path) -> Callable[..., Settings]:
    """Embedded settings with the registry in this test's temporary folder."""

    def make(**overrides: object) -> Settings:
        return Settings(**{"registry_url": str(tmp_path / "registry"), **overrides})

    return make
