"""The transport boundary: topics with partitions, consumer groups, manual commits.

Implementations (in-memory and Kafka) are held to one contract suite
(``tests/contracts/test_transport_contract.py``). Semantics every implementation keeps:

* ``send`` returns a :class:`SendResult` future; ``flush`` blocks until every send so far
  is acknowledged by the broker (or raises :class:`TransportError`).
* A consumer in a group owns a subset of partitions; members joining or leaving
  rebalance them. ``poll`` returns records from the committed offset on; records polled
  but never committed are delivered again to whoever owns the partition next.
* ``commit(offsets)`` stores, per partition, the offset of the *next* record to read.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import NamedTuple


class TransportError(RuntimeError):
    """The broker could not be reached or refused an operation."""


class TopicPartition(NamedTuple):
    topic: str
    partition: int


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    timestamp_ms: int

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)


class SendResult(abc.ABC):
    """Handle on one produced record."""

    @abc.abstractmethod
    def get(self, timeout: float | None = None) -> tuple[int, int]:
        """Block until acknowledged; return (partition, offset) or raise TransportError."""


class Producer(abc.ABC):
    @abc.abstractmethod
    def send(self, topic: str, value: bytes, key: bytes | None = None) -> SendResult:
        """Queue one record; records with the same key go to the same partition."""

    @abc.abstractmethod
    def flush(self, timeout: float | None = None) -> None:
        """Block until every record sent so far is acknowledged."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Consumer(abc.ABC):
    @abc.abstractmethod
    def poll(self, timeout_ms: int, max_records: int) -> list[Record]:
        """Return up to ``max_records`` records (possibly none) within ``timeout_ms``."""

    @abc.abstractmethod
    def commit(self, offsets: dict[TopicPartition, int]) -> None:
        """Commit, per partition, the offset of the next record to read."""

    @abc.abstractmethod
    def assignment(self) -> set[TopicPartition]:
        """Partitions this member owns now."""

    @abc.abstractmethod
    def lag(self) -> dict[TopicPartition, int]:
        """Per owned partition: records between the committed offset and the end."""

    @abc.abstractmethod
    def close(self) -> None:
        """Leave the group; owned partitions go to the remaining members."""

    def __enter__(self) -> Consumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Transport(abc.ABC):
    """Factory of producers and consumers for one cluster (or one in-process broker)."""

    @abc.abstractmethod
    def producer(self) -> Producer: ...

    @abc.abstractmethod
    def consumer(self, topics: list[str], group_id: str) -> Consumer: ...

    @abc.abstractmethod
    def ping(self, timeout: float = 2.0) -> bool:
        """True when the broker answers (used by readiness probes)."""


def next_offsets(records: list[Record]) -> dict[TopicPartition, int]:
    """Offsets to commit after processing ``records``: highest offset + 1 per partition.

    Example:
        >>> r = [Record("t", 0, 5, None, b"", 0), Record("t", 0, 6, None, b"", 0), Record("t", 1, 2, None, b"", 0)]
        >>> sorted(next_offsets(r).items())
        [(TopicPartition(topic='t', partition=0), 7), (TopicPartition(topic='t', partition=1), 3)]
    """
    out: dict[TopicPartition, int] = {}
    for r in records:
        out[r.tp] = max(out.get(r.tp, 0), r.offset + 1)
    return out
