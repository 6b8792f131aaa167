"""In-memory transport: the embedded default, with Kafka's semantics in one process.

Topics have a fixed number of partitions, consumer groups split them among members
(range assignment, rebalanced when a member joins or leaves), offsets are committed
by hand, and records polled but not committed are delivered again to the partition's
next owner. Thread-safe; one :class:`MemoryBroker` is shared by every client of a
:class:`MemoryTransport`.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import zlib
from collections import defaultdict

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


class _Done(SendResult):
    def __init__(self, partition: int, offset: int) -> None:
        self._result = (partition, offset)

    def get(self, timeout: float | None = None) -> tuple[int, int]:
        return self._result


class MemoryBroker:
    """Topics, logs and consumer-group state for every in-memory client."""

    def __init__(self, partitions: int = 4) -> None:
        self.default_partitions = partitions
        self._logs: dict[str, list[list[Record]]] = {}
        self._committed: dict[tuple[str, TopicPartition], int] = {}
        self._members: dict[str, dict[str, list[str]]] = defaultdict(dict)  # group -> member -> topics
        self._generation: dict[str, int] = defaultdict(int)
        self._round_robin = itertools.count()
        self.cond = threading.Condition()

    def create_topic(self, topic: str, partitions: int | None = None) -> None:
        with self.cond:
            self._ensure(topic, partitions)

    def _ensure(self, topic: str, partitions: int | None = None) -> list[list[Record]]:
        if topic not in self._logs:
            self._logs[topic] = [[] for _ in range(partitions or self.default_partitions)]
        return self._logs[topic]

    def partitions(self, topic: str) -> int:
        with self.cond:
            return len(self._ensure(topic))

    def append(self, topic: str, key: bytes | None, value: bytes) -> tuple[int, int]:
        with self.cond:
            log = self._ensure(topic)
            if key is None:
                partition = next(self._round_robin) % len(log)
            else:
                partition = zlib.crc32(key) % len(log)
            offset = len(log[partition])
            log[partition].append(Record(topic, partition, offset, key, value, int(time.time() * 1000)))
            self.cond.notify_all()
            return partition, offset

    def read(self, tp: TopicPartition, offset: int, limit: int) -> list[Record]:
        return self._ensure(tp.topic)[tp.partition][offset:offset + limit]

    def end_offset(self, tp: TopicPartition) -> int:
        return len(self._ensure(tp.topic)[tp.partition])

    def committed(self, group: str, tp: TopicPartition) -> int:
        return self._committed.get((group, tp), 0)

    def join(self, group: str, member: str, topics: list[str]) -> None:
        with self.cond:
            for t in topics:
                self._ensure(t)
            self._members[group][member] = list(topics)
            self._generation[group] += 1
            self.cond.notify_all()

    def leave(self, group: str, member: str) -> None:
        with self.cond:
            if self._members[group].pop(member, None) is not None:
                self._generation[group] += 1
                self.cond.notify_all()

    def generation(self, group: str) -> int:
        return self._generation[group]

    def assignment(self, group: str, member: str) -> set[TopicPartition]:
        """Range assignment: each topic's partitions split in order over sorted members."""
        members = self._members[group]
        if member not in members:
            return set()
        owned: set[TopicPartition] = set()
        for topic in {t for ts in members.values() for t in ts}:
            subscribed = sorted(m for m, ts in members.items() if topic in ts)
            if member not in subscribed:
                continue
            n, k = len(self._logs[topic]), len(subscribed)
            i = subscribed.index(member)
            per, extra = divmod(n, k)
            start = i * per + min(i, extra)
            owned.update(TopicPartition(topic, p) for p in range(start, start + per + (1 if i < extra else 0)))
        return owned

    def commit(self, group: str, member: str, offsets: dict[TopicPartition, int]) -> None:
        with self.cond:
            owned = self.assignment(group, member)
            foreign = [tp for tp in offsets if tp not in owned]
            if foreign:
                raise TransportError(f"commit refused: {member} no longer owns {sorted(foreign)} (rebalanced)")
            for tp, offset in offsets.items():
                self._committed[(group, tp)] = offset


class MemoryProducer(Producer):
    def __init__(self, broker: MemoryBroker) -> None:
        self._broker = broker
        self._closed = False

    def send(self, topic: str, value: bytes, key: bytes | None = None) -> SendResult:
        if self._closed:
            raise TransportError("producer is closed")
        return _Done(*self._broker.append(topic, key, value))

    def flush(self, timeout: float | None = None) -> None:
        return None

    def close(self) -> None:
        self._closed = True


class MemoryConsumer(Consumer):
    _ids = itertools.count()

    def __init__(self, broker: MemoryBroker, topics: list[str], group_id: str) -> None:
        self._broker = broker
        self._group = group_id
        self._member = f"member-{next(self._ids):06d}"
        self._topics = list(topics)
        self._positions: dict[TopicPartition, int] = {}
        self._generation = -1
        self._joined = False
        self._next_first = 0  # partition that the next poll reads first, so that none starves
        self._closed = False

    def _sync(self) -> None:
        """Join at first use (like Kafka, at the first poll); after a rebalance, resume every
        owned partition from its committed offset."""
        if self._closed:
            raise TransportError(f"consumer {self._member} of group {self._group} is closed")
        if not self._joined:
            self._broker.join(self._group, self._member, self._topics)
            self._joined = True
        generation = self._broker.generation(self._group)
        if generation != self._generation:
            self._generation = generation
            owned = self._broker.assignment(self._group, self._member)
            self._positions = {tp: self._broker.committed(self._group, tp) for tp in owned}

    def poll(self, timeout_ms: int, max_records: int) -> list[Record]:
        deadline = time.monotonic() + timeout_ms / 1000
        with self._broker.cond:
            while True:
                self._sync()
                records = self._take(max_records)
                remaining = deadline - time.monotonic()
                if records or remaining <= 0:
                    return records
                self._broker.cond.wait(remaining)

    def _take(self, max_records: int) -> list[Record]:
        out: list[Record] = []
        owned = sorted(self._positions)
        if owned:
            start = self._next_first % len(owned)
            owned = owned[start:] + owned[:start]
            self._next_first += 1
        for tp in owned:
            if len(out) >= max_records:
                break
            batch = self._broker.read(tp, self._positions[tp], max_records - len(out))
            if batch:
                self._positions[tp] = batch[-1].offset + 1
                out.extend(batch)
        return out

    def commit(self, offsets: dict[TopicPartition, int]) -> None:
        if self._closed:
            raise TransportError(f"consumer {self._member} of group {self._group} is closed")
        if offsets:  # checked against the broker's assignment: a rebalance refuses it at once
            self._broker.commit(self._group, self._member, offsets)

    def assignment(self) -> set[TopicPartition]:
        with self._broker.cond:
            self._sync()
            return set(self._positions)

    def lag(self) -> dict[TopicPartition, int]:
        with self._broker.cond:
            self._sync()
            return {tp: self._broker.end_offset(tp) - self._broker.committed(self._group, tp)
                    for tp in self._positions}

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._joined:
                self._broker.leave(self._group, self._member)


class MemoryTransport(Transport):
    """Clients of one in-process :class:`MemoryBroker`."""

    _shared: MemoryTransport | None = None
    _shared_lock = threading.Lock()

    def __init__(self, broker: MemoryBroker | None = None) -> None:
        self.broker = broker or MemoryBroker()

    @classmethod
    def shared(cls) -> MemoryTransport:
        """The process-wide instance, so that every component of one process meets."""
        with cls._shared_lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    def producer(self) -> Producer:
        return MemoryProducer(self.broker)

    def consumer(self, topics: list[str], group_id: str) -> Consumer:
        return MemoryConsumer(self.broker, topics, group_id)

    def ping(self, timeout: float = 2.0) -> bool:
        return True
