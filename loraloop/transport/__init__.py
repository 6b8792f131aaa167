"""Transport boundary: :class:`Transport` with in-memory and Kafka implementations."""

from __future__ import annotations

from loraloop.settings import Settings
from loraloop.transport.base import (
    Consumer,
    Producer,
    Record,
    SendResult,
    TopicPartition,
    Transport,
    TransportError,
    next_offsets,
)

__all__ = ["Consumer", "Producer", "Record", "SendResult", "TopicPartition", "Transport",
           "TransportError", "next_offsets", "make_transport"]


def make_transport(settings: Settings) -> Transport:
    """The transport named by ``settings.transport`` (the in-memory one is per process)."""
    if settings.transport == "kafka":
        from loraloop.transport.kafka import KafkaTransport

        return KafkaTransport(settings)
    from loraloop.transport.memory import MemoryTransport

    return MemoryTransport.shared()
