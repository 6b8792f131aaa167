"""Kafka transport (kafka-python): consumer groups, manual commits, configurable API version.

Everything kafka-python specific stays in this module. ``kafka_api_version`` is a
setting, not a constant: modern brokers negotiate it, Kafka 0.9 needs ``0.9``.
Security settings (SSL, SASL) pass through when set.
"""

from __future__ import annotations

import logging
import uuid

from loraloop.settings import Settings
from loraloop.transport.base import (
    Consumer,
    Producer,
    Record,
    SendResult,
    TopicPartition,
    Transport,
    TransportError,
)

logger = logging.getLogger(__name__)


def client_config(settings: Settings) -> dict[str, object]:
    """kafka-python options shared by producers and consumers."""
    config: dict[str, object] = {
        "bootstrap_servers": [s.strip() for s in settings.kafka_bootstrap.split(",") if s.strip()],
        "security_protocol": settings.kafka_security_protocol,
        "reconnect_backoff_max_ms": 2000,
    }
    version = settings.kafka_api_version_tuple
    if version is not None:
        config["api_version"] = version
    optional = {
        "sasl_mechanism": settings.kafka_sasl_mechanism,
        "sasl_plain_username": settings.kafka_sasl_username,
        "sasl_plain_password": settings.kafka_sasl_password.get_secret_value(),
        "ssl_cafile": settings.kafka_ssl_cafile,
        "ssl_certfile": settings.kafka_ssl_certfile,
        "ssl_keyfile": settings.kafka_ssl_keyfile,
    }
    config.update({k: v for k, v in optional.items() if v})
    return config


class _KafkaSend(SendResult):
    def __init__(self, future: object) -> None:
        self._future = future

    def get(self, timeout: float | None = None) -> tuple[int, int]:
        from kafka.errors import KafkaError

        try:
            meta = self._future.get(timeout=timeout)
        except KafkaError as e:
            raise TransportError(f"send failed: {e}") from e
        return meta.partition, meta.offset


class KafkaProducerAdapter(Producer):
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._producer = None

    def _client(self):
        if self._producer is None:
            from kafka import KafkaProducer
            from kafka.errors import KafkaError

            try:
                self._producer = KafkaProducer(acks="all", retries=10, linger_ms=2, max_block_ms=30_000,
                                               retry_backoff_ms=200, request_timeout_ms=30_000,
                                               **client_config(self._settings))
            except KafkaError as e:
                raise TransportError(f"cannot connect a producer to {self._settings.kafka_bootstrap}: {e}") from e
        return self._producer

    def send(self, topic: str, value: bytes, key: bytes | None = None) -> SendResult:
        from kafka.errors import KafkaError

        try:
            return _KafkaSend(self._client().send(topic, value=value, key=key))
        except KafkaError as e:
            raise TransportError(f"send to {topic} failed: {e}") from e

    def flush(self, timeout: float | None = None) -> None:
        from kafka.errors import KafkaError

        if self._producer is None:
            return
        try:
            self._producer.flush(timeout=timeout)
        except KafkaError as e:
            raise TransportError(f"flush failed: {e}") from e

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=10)
            self._producer = None


def _timeouts(settings: Settings) -> dict[str, int]:
    """Brokers before 0.10.1 have one timeout for both liveness and slow processing."""
    version = settings.kafka_api_version_tuple
    if version is not None and version < (0, 10, 1):
        return {"session_timeout_ms": 30_000, "max_poll_interval_ms": 30_000}
    return {"session_timeout_ms": 10_000, "max_poll_interval_ms": 300_000}


class KafkaConsumerAdapter(Consumer):
    def __init__(self, settings: Settings, topics: list[str], group_id: str) -> None:
        self._settings = settings
        self._topics = list(topics)
        self._group = group_id
        self._consumer = None

    def _client(self):
        if self._consumer is None:
            from kafka import KafkaConsumer
            from kafka.errors import KafkaError

            try:
                self._consumer = KafkaConsumer(
                    *self._topics, group_id=self._group, enable_auto_commit=False, auto_offset_reset="earliest",
                    client_id=f"loraloop-{uuid.uuid4().hex[:6]}", heartbeat_interval_ms=1_000,
                    request_timeout_ms=40_000, fetch_max_wait_ms=100, **_timeouts(self._settings),
                    **client_config(self._settings))
            except KafkaError as e:
                raise TransportError(f"cannot join group {self._group} at {self._settings.kafka_bootstrap}: {e}") from e
        return self._consumer

    def poll(self, timeout_ms: int, max_records: int) -> list[Record]:
        from kafka.errors import KafkaError

        try:
            batches = self._client().poll(timeout_ms=timeout_ms, max_records=max_records)
        except KafkaError as e:
            raise TransportError(f"poll failed: {e}") from e
        records = [Record(m.topic, m.partition, m.offset, m.key, m.value, m.timestamp)
                   for messages in batches.values() for m in messages]
        records.sort(key=lambda r: (r.topic, r.partition, r.offset))
        return records

    def commit(self, offsets: dict[TopicPartition, int]) -> None:
        from kafka import TopicPartition as KafkaTP
        from kafka.errors import KafkaError
        from kafka.structs import OffsetAndMetadata

        if not offsets:
            return
        try:
            self._client().commit({KafkaTP(tp.topic, tp.partition): OffsetAndMetadata(offset, "", -1)
                                   for tp, offset in offsets.items()})
        except KafkaError as e:  # CommitFailedError after a rebalance included
            raise TransportError(f"commit failed: {e}") from e

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition(tp.topic, tp.partition) for tp in self._client().assignment()}

    def lag(self) -> dict[TopicPartition, int]:
        from kafka.errors import KafkaError

        consumer = self._client()
        owned = list(consumer.assignment())
        if not owned:
            return {}
        try:
            ends = consumer.end_offsets(owned)
            return {TopicPartition(tp.topic, tp.partition): max(0, ends[tp] - (consumer.committed(tp) or 0))
                    for tp in owned}
        except KafkaError as e:
            raise TransportError(f"lag lookup failed: {e}") from e

    def close(self) -> None:
        if self._consumer is not None:
            try:
                self._consumer.close(autocommit=False)
            finally:
                self._consumer = None


class KafkaTransport(Transport):
    def __init__(self, settings: Settings) -> None:
        settings.kafka_api_version_tuple  # noqa: B018 - refuse a bad version string up front
        self.settings = settings

    def producer(self) -> Producer:
        return KafkaProducerAdapter(self.settings)

    def consumer(self, topics: list[str], group_id: str) -> Consumer:
        return KafkaConsumerAdapter(self.settings, topics, group_id)

    def ping(self, timeout: float = 2.0) -> bool:
        from kafka import KafkaClient

        client = None
        try:
            client = KafkaClient(request_timeout_ms=int(timeout * 1000), **client_config(self.settings))
            return bool(client.check_version(timeout=timeout) if hasattr(client, "check_version") else True)
        except Exception:  # any failure means "not reachable" for a readiness probe
            return False
        finally:
            if client is not None:
                client.close()
