"""Kafka transport (kafka-python): consumer groups, manual commits, configurable API version.

Everything kafka-python specific stays in this module. ``kafka_api_version`` is a
setting, not a constant: modern brokers negotiate it, Kafka 0.9 needs ``0.9`` (kafka-python
3.x cannot negotiate with brokers older than 0.10). Security settings (SSL, SASL) pass
through when set.

Delivery is at least once: the producer waits for every in-sync replica (``acks="all"``)
and retries until ``delivery_timeout_ms``, one request in flight per connection so that
retries keep the order within a partition; consumers never auto-commit, and a consumer
that leaves (``close``) or loses its partitions hands them over at the last committed
offset.
"""

from __future__ import annotations

import logging
import socket
import threading
import uuid

from loraloop.settings import Settings
from loraloop.transport import kafka_join_fix
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

# Kafka before 0.10.1 has one timeout for both liveness and processing time between polls
# (kafka-python makes max_poll_interval_ms equal to it), so it gets the broker's default
# maximum; newer brokers detect a dead member after 10 s and allow 5 min between polls.
_SESSION_TIMEOUT_MS_PRE_0_10_1 = 30_000
_SESSION_TIMEOUT_MS = 10_000
_HEARTBEAT_INTERVAL_MS = 1_000
# A member that joined before its topic existed (auto-created by the first producer) is assigned nothing
# until it sees the topic's partitions in fresh metadata: 5 s, not kafka-python's 5 minutes.
_CONSUMER_METADATA_MAX_AGE_MS = 5_000
_COMMIT_TIMEOUT_MS = 15_000
_OFFSETS_TIMEOUT_MS = 10_000


def client_config(settings: Settings) -> dict[str, object]:
    """kafka-python options shared by producers, consumers and the admin client.

    Raises:
        ValueError: ``kafka_api_version`` is not a version such as ``0.9`` or ``2.8``.
    """
    config: dict[str, object] = {
        "bootstrap_servers": [s.strip() for s in settings.kafka_bootstrap.split(",") if s.strip()],
        "security_protocol": settings.kafka_security_protocol,
        "reconnect_backoff_ms": 100,
        "reconnect_backoff_max_ms": 2_000,
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
    config.update({k: v for k, v in optional.items() if v})  # unset options keep kafka-python's defaults
    return config


def _listening(bootstrap: str, timeout_s: float = 2.0) -> bool:
    """Whether any bootstrap address accepts a TCP connection (a broker or anything else)."""
    for address in (a.strip() for a in bootstrap.split(",") if a.strip()):
        host, _, port = address.rpartition(":")
        try:
            with socket.create_connection((host.strip("[]") or "localhost", int(port)), timeout=timeout_s):
                return True
        except (OSError, ValueError):
            continue
    return False


def _connect_hint(settings: Settings) -> str:
    """What to check: the address when nothing listens there, the API version when something does."""
    if not _listening(settings.kafka_bootstrap):
        return f" (nothing accepts connections at {settings.kafka_bootstrap}: is the broker running? " \
               "check kafka_bootstrap)"
    if settings.kafka_api_version_tuple is None:
        return " (brokers older than 0.10 cannot negotiate a version: set kafka_api_version, e.g. 0.9)"
    return ""


def _session_timeouts(settings: Settings) -> dict[str, int]:
    version = settings.kafka_api_version_tuple
    if version is not None and version < (0, 10, 1):
        return {"session_timeout_ms": _SESSION_TIMEOUT_MS_PRE_0_10_1}
    return {"session_timeout_ms": _SESSION_TIMEOUT_MS}


class _KafkaSend(SendResult):
    def __init__(self, future: object, topic: str) -> None:
        self._future = future
        self._topic = topic

    def get(self, timeout: float | None = None) -> tuple[int, int]:
        from kafka.errors import KafkaError

        try:
            meta = self._future.get(timeout=timeout)
        except KafkaError as e:
            raise TransportError(f"send to {self._topic} failed: {e}") from e
        return meta.partition, meta.offset


class KafkaProducerAdapter(Producer):
    """One lazily created ``KafkaProducer``; ``flush`` reports every failed send since the last flush."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._producer = None
        self._lock = threading.Lock()
        self._failures: list[BaseException] = []  # appended by kafka-python's sender thread

    def _client(self):
        with self._lock:
            if self._producer is None:
                from kafka import KafkaProducer
                from kafka.errors import KafkaError

                try:
                    self._producer = KafkaProducer(
                        acks="all", linger_ms=2, max_block_ms=20_000, retry_backoff_ms=200,
                        delivery_timeout_ms=120_000, max_in_flight_requests_per_connection=1,
                        client_id=f"loraloop-producer-{uuid.uuid4().hex[:6]}", **client_config(self._settings))
                except KafkaError as e:
                    raise TransportError(f"cannot connect a producer to {self._settings.kafka_bootstrap}: {e}"
                                         f"{_connect_hint(self._settings)}") from e
            return self._producer

    def send(self, topic: str, value: bytes, key: bytes | None = None) -> SendResult:
        from kafka.errors import KafkaError

        try:
            future = self._client().send(topic, value=value, key=key)
        except KafkaError as e:  # metadata unavailable within max_block_ms, record too large, ...
            raise TransportError(f"send to {topic} failed: {e}") from e
        future.add_errback(self._failures.append)
        return _KafkaSend(future, topic)

    def flush(self, timeout: float | None = None) -> None:
        """Block until every record sent so far is acknowledged.

        Raises:
            TransportError: the records are not all acknowledged within ``timeout`` seconds,
                or some were refused or expired since the previous flush.
        """
        from kafka.errors import KafkaError

        if self._producer is None:
            return
        try:
            self._producer.flush(timeout=timeout)
        except KafkaError as e:
            raise TransportError(f"flush did not complete within {timeout} s: {e}") from e
        failures, self._failures = self._failures, []
        if failures:
            raise TransportError(f"{len(failures)} record(s) were not delivered since the last flush; "
                                 f"first error: {failures[0]!r}")

    def close(self) -> None:
        from kafka.errors import KafkaError

        with self._lock:
            producer, self._producer = self._producer, None
        if producer is not None:
            try:
                producer.close(timeout=10)
            except KafkaError as e:
                logger.warning("closing the Kafka producer failed: %s", e)


class KafkaConsumerAdapter(Consumer):
    """One lazily created ``KafkaConsumer`` in a group; it joins the group at its first poll."""

    def __init__(self, settings: Settings, topics: list[str], group_id: str) -> None:
        self._settings = settings
        self._topics = list(topics)
        self._group = group_id
        self._consumer = None
        self._closed = False

    def _client(self):
        if self._closed:
            raise TransportError(f"consumer of group {self._group} is closed")
        if self._consumer is None:
            from kafka import KafkaConsumer
            from kafka.errors import KafkaError

            kafka_join_fix.apply()  # else a member busy between polls can keep its group rebalancing
            try:
                self._consumer = KafkaConsumer(
                    *self._topics, group_id=self._group, enable_auto_commit=False, auto_offset_reset="earliest",
                    client_id=f"loraloop-{self._group}-{uuid.uuid4().hex[:6]}",
                    heartbeat_interval_ms=_HEARTBEAT_INTERVAL_MS, fetch_max_wait_ms=100,
                    metadata_max_age_ms=_CONSUMER_METADATA_MAX_AGE_MS,
                    **_session_timeouts(self._settings), **client_config(self._settings))
            except KafkaError as e:
                raise TransportError(f"cannot create a consumer of group {self._group} at "
                                     f"{self._settings.kafka_bootstrap}: {e}{_connect_hint(self._settings)}") from e
        return self._consumer

    def poll(self, timeout_ms: int, max_records: int) -> list[Record]:
        from kafka.errors import KafkaError

        consumer = self._client()
        try:
            batches = consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        except KafkaError as e:
            raise TransportError(f"poll of group {self._group} failed: {e}") from e
        records = [Record(m.topic, m.partition, m.offset, m.key, m.value, m.timestamp)
                   for messages in batches.values() for m in messages]
        records.sort(key=lambda r: (r.topic, r.partition, r.offset))
        return records

    def commit(self, offsets: dict[TopicPartition, int]) -> None:
        """Commit the next offsets to read; refused for partitions this member no longer owns.

        Raises:
            TransportError: a partition was reassigned by a rebalance (its records will be
                delivered again to its new owner), or the coordinator refused or did not answer.
        """
        from kafka import OffsetAndMetadata
        from kafka import TopicPartition as KafkaTP
        from kafka.errors import KafkaError

        if not offsets:
            return
        consumer = self._client()
        owned = {TopicPartition(tp.topic, tp.partition) for tp in consumer.assignment()}
        foreign = sorted(tp for tp in offsets if tp not in owned)
        if foreign:
            # Kafka 0.9 accepts a commit from any member of the current generation, even
            # for partitions it does not own; refusing here keeps the memory broker's contract.
            raise TransportError(f"commit refused: this member of {self._group} no longer owns {foreign} "
                                 "(rebalanced)")
        request = {KafkaTP(tp.topic, tp.partition): OffsetAndMetadata(offset, "", -1)
                   for tp, offset in offsets.items()}
        try:
            consumer.commit(request, timeout_ms=_COMMIT_TIMEOUT_MS)
        except KafkaError as e:  # CommitFailedError after a rebalance included
            raise TransportError(f"commit to group {self._group} failed: {e}") from e

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition(tp.topic, tp.partition) for tp in self._client().assignment()}

    def lag(self) -> dict[TopicPartition, int]:
        from kafka.errors import KafkaError

        consumer = self._client()
        owned = sorted(consumer.assignment())
        if not owned:
            return {}
        try:
            ends = consumer.end_offsets(owned, timeout_ms=_OFFSETS_TIMEOUT_MS)
            committed = {tp: consumer.committed(tp, timeout_ms=_OFFSETS_TIMEOUT_MS) for tp in owned}
            never = [tp for tp, offset in committed.items() if offset is None]
            if never:  # nothing committed yet: reading starts at the log start (auto_offset_reset)
                committed.update(consumer.beginning_offsets(never, timeout_ms=_OFFSETS_TIMEOUT_MS))
        except KafkaError as e:
            raise TransportError(f"lag lookup of group {self._group} failed: {e}") from e
        return {TopicPartition(tp.topic, tp.partition): max(0, ends[tp] - committed[tp]) for tp in owned}

    def close(self) -> None:
        """Leave the group (LeaveGroup) without committing: the next owner resumes at the last commit."""
        from kafka.errors import KafkaError

        self._closed = True
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            try:
                consumer.close(autocommit=False)
            except KafkaError as e:
                logger.warning("closing a consumer of group %s failed: %s", self._group, e)


class KafkaTransport(Transport):
    """Producers and consumers for one Kafka cluster.

    Args:
        settings: ``kafka_bootstrap``, ``kafka_api_version`` and the security settings are used.

    Raises:
        ValueError: ``settings.kafka_api_version`` is not a version such as ``0.9`` or ``2.8``.
    """

    def __init__(self, settings: Settings) -> None:
        settings.kafka_api_version_tuple  # noqa: B018 - refuse a bad version string up front
        if not client_config(settings)["bootstrap_servers"]:
            raise ValueError(f"kafka_bootstrap names no server: {settings.kafka_bootstrap!r}")
        self.settings = settings

    def producer(self) -> Producer:
        return KafkaProducerAdapter(self.settings)

    def consumer(self, topics: list[str], group_id: str) -> Consumer:
        return KafkaConsumerAdapter(self.settings, topics, group_id)

    def ping(self, timeout: float = 2.0) -> bool:
        """True when a broker answers a metadata request within ``timeout`` seconds."""
        from kafka import KafkaAdminClient

        timeout_ms = max(1, int(timeout * 1000))
        try:
            admin = KafkaAdminClient(bootstrap_timeout_ms=timeout_ms, request_timeout_ms=timeout_ms,
                                     **client_config(self.settings))
        except Exception as e:  # any failure means "not ready" for a readiness probe
            logger.debug("Kafka at %s does not answer: %s", self.settings.kafka_bootstrap, e)
            return False
        try:
            return bool(admin.describe_cluster().get("brokers"))
        except Exception as e:
            logger.debug("Kafka at %s does not answer: %s", self.settings.kafka_bootstrap, e)
            return False
        finally:
            admin.close()
