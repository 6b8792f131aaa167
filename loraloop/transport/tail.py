"""Reading topics from *now* on, outside any consumer group: what a client waiting for answers needs.

A consumer group (``Transport.consumer``) starts a new group at the beginning of the log and
splits partitions among its members; a client that waits for its own predictions wants every
partition, from the records produced after it started, without joining, committing or
rebalancing anything. :func:`tail` gives that reader for the in-memory and the Kafka transport.

The end of each partition is read when the reader is created, so nothing produced after that
is missed; partitions that appear later (a topic auto-created by its first record) are read
from their beginning, since everything in them is newer than the reader.

Example:
    >>> from loraloop.transport.memory import MemoryTransport
    >>> transport = MemoryTransport()
    >>> producer = transport.producer()
    >>> _ = producer.send("t", b"before")
    >>> reader = tail(transport, ["t"])
    >>> _ = producer.send("t", b"after")
    >>> [r.value for r in reader.poll(timeout_ms=100, max_records=10)]
    [b'after']
"""

from __future__ import annotations

import abc
import logging
import time
import uuid

from loraloop.transport.base import Record, TopicPartition, Transport, TransportError

logger = logging.getLogger(__name__)

_REFRESH_S = 2.0  # how often a Kafka tail looks for partitions it does not read yet
_REFRESH_EMPTY_S = 0.5  # ... while a topic has none at all (auto-created by its first record)
_OFFSETS_TIMEOUT_MS = 10_000


class TailReader(abc.ABC):
    """Records of some topics produced after the reader was created, every partition, no group."""

    @abc.abstractmethod
    def poll(self, timeout_ms: int, max_records: int) -> list[Record]:
        """Up to ``max_records`` new records (possibly none) within ``timeout_ms``."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> TailReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def tail(transport: Transport, topics: list[str]) -> TailReader:
    """A :class:`TailReader` of ``topics`` on ``transport``.

    Raises:
        TransportError: the broker cannot be reached to read the partitions' ends.
    """
    from loraloop.transport.memory import MemoryTransport

    if isinstance(transport, MemoryTransport):
        return _MemoryTail(transport, topics)
    from loraloop.transport.kafka import KafkaTransport

    if isinstance(transport, KafkaTransport):
        return _KafkaTail(transport, topics)
    return _GroupTail(transport, topics)


class _MemoryTail(TailReader):
    def __init__(self, transport: object, topics: list[str]) -> None:
        self._broker = transport.broker
        self._topics = list(topics)
        with self._broker.cond:
            self._positions = {tp: self._broker.end_offset(tp) for tp in self._partitions()}

    def _partitions(self) -> list[TopicPartition]:
        return [TopicPartition(t, p) for t in self._topics for p in range(self._broker.partitions(t))]

    def poll(self, timeout_ms: int, max_records: int) -> list[Record]:
        deadline = time.monotonic() + timeout_ms / 1000
        with self._broker.cond:
            while True:
                out: list[Record] = []
                for tp in self._partitions():
                    position = self._positions.setdefault(tp, 0)
                    batch = self._broker.read(tp, position, max_records - len(out))
                    if batch:
                        self._positions[tp] = batch[-1].offset + 1
                        out.extend(batch)
                    if len(out) >= max_records:
                        break
                remaining = deadline - time.monotonic()
                if out or remaining <= 0:
                    return out
                self._broker.cond.wait(remaining)

    def close(self) -> None:
        return None


class _KafkaTail(TailReader):
    """A group-less ``KafkaConsumer`` assigned every partition of the topics, positioned at their ends."""

    def __init__(self, transport: object, topics: list[str]) -> None:
        from kafka import KafkaConsumer
        from kafka.errors import KafkaError

        from loraloop.transport.kafka import client_config

        self._settings = transport.settings
        self._topics = list(topics)
        try:
            self._consumer = KafkaConsumer(group_id=None, enable_auto_commit=False, fetch_max_wait_ms=100,
                                           metadata_max_age_ms=1_000, request_timeout_ms=15_000,
                                           client_id=f"loraloop-tail-{uuid.uuid4().hex[:6]}",
                                           **client_config(self._settings))
        except KafkaError as e:
            raise TransportError(f"cannot connect a reader to {self._settings.kafka_bootstrap}: {e}") from e
        self._assigned: set[TopicPartition] = set()
        self._refreshed = -float("inf")
        self._refresh(first=True)

    def _refresh(self, first: bool = False) -> None:
        """Assign partitions not read yet: at their end when the reader starts, else at their beginning."""
        from kafka import TopicPartition as KafkaTP
        from kafka.errors import KafkaError

        self._refreshed = time.monotonic()
        try:
            found = {TopicPartition(t, p) for t in self._topics for p in (self._consumer.partitions_for_topic(t) or ())}
            new = found - self._assigned
            if not new:
                return
            self._consumer.assign([KafkaTP(tp.topic, tp.partition) for tp in sorted(self._assigned | new)])
            targets = [KafkaTP(tp.topic, tp.partition) for tp in sorted(new)]
            ends = (self._consumer.end_offsets(targets, timeout_ms=_OFFSETS_TIMEOUT_MS) if first
                    else self._consumer.beginning_offsets(targets, timeout_ms=_OFFSETS_TIMEOUT_MS))
            for tp, offset in ends.items():
                self._consumer.seek(tp, offset)
        except KafkaError as e:
            raise TransportError(f"reading the partitions of {self._topics} at {self._settings.kafka_bootstrap} "
                                 f"failed: {e}") from e
        self._assigned |= new
        logger.debug("tail of %s reads %d partition(s)", self._topics, len(self._assigned))

    def poll(self, timeout_ms: int, max_records: int) -> list[Record]:
        from kafka.errors import KafkaError

        every = _REFRESH_EMPTY_S if len({tp.topic for tp in self._assigned}) < len(self._topics) else _REFRESH_S
        if time.monotonic() - self._refreshed > every:
            self._refresh()
        if not self._assigned:
            time.sleep(min(timeout_ms / 1000, _REFRESH_EMPTY_S))
            return []
        try:
            batches = self._consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        except KafkaError as e:
            raise TransportError(f"reading {self._topics} failed: {e}") from e
        records = [Record(m.topic, m.partition, m.offset, m.key, m.value, m.timestamp)
                   for messages in batches.values() for m in messages]
        records.sort(key=lambda r: (r.topic, r.partition, r.offset))
        return records

    def close(self) -> None:
        from kafka.errors import KafkaError

        try:
            self._consumer.close(autocommit=False)
        except KafkaError as e:
            logger.debug("closing a tail reader failed: %s", e)


class _GroupTail(TailReader):
    """Any other transport: a group of its own, records older than the reader skipped by timestamp."""

    def __init__(self, transport: Transport, topics: list[str]) -> None:
        self._consumer = transport.consumer(list(topics), f"loraloop-tail-{uuid.uuid4().hex}")
        self._since_ms = int(time.time() * 1000) - 1_000  # producer clocks may lag a little

    def poll(self, timeout_ms: int, max_records: int) -> list[Record]:
        return [r for r in self._consumer.poll(timeout_ms, max_records) if r.timestamp_ms >= self._since_ms]

    def close(self) -> None:
        self._consumer.close()
