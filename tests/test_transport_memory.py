"""What only the in-memory broker has to show (the shared semantics are in the transport contract)."""

from __future__ import annotations

import threading
import time
import zlib

import pytest

from loraloop.settings import Settings
from loraloop.transport import TopicPartition, TransportError, make_transport, next_offsets
from loraloop.transport.memory import MemoryBroker, MemoryTransport


def test_poll_waits_for_a_record_and_wakes_when_one_arrives():
    transport = MemoryTransport()
    with transport.consumer(["t"], "g") as consumer:
        started = time.monotonic()
        assert consumer.poll(timeout_ms=150, max_records=10) == []
        assert time.monotonic() - started >= 0.14  # waited out the timeout

        def send_later() -> None:
            time.sleep(0.1)
            transport.producer().send("t", b"late")

        threading.Thread(target=send_later).start()
        started = time.monotonic()
        records = consumer.poll(timeout_ms=5_000, max_records=10)
        assert [r.value for r in records] == [b"late"]
        assert time.monotonic() - started < 2  # woken by the send, not by the timeout


def test_partitioning_by_key_and_round_robin_without_a_key():
    broker = MemoryBroker(partitions=3)
    producer = MemoryTransport(broker).producer()
    assert producer.send("t", b"v", key=b"user-7").get()[0] == zlib.crc32(b"user-7") % 3
    assert {producer.send("t", b"v").get()[0] for _ in range(3)} == {0, 1, 2}
    broker.create_topic("wide", 8)
    assert broker.partitions("wide") == 8
    assert broker.partitions("t") == 3


def test_range_assignment_over_members_and_topics():
    transport = MemoryTransport(MemoryBroker(partitions=4))
    members = [transport.consumer(["a", "b"], "g"), transport.consumer(["a", "b"], "g"),
               transport.consumer(["a"], "g")]
    for m in members:
        m.poll(0, 1)
    owned = [m.assignment() for m in members]
    assert sorted(len(o) for o in owned) == [1, 3, 4]  # a: 2+1+1, b: 2+2
    assert set().union(*owned) == {TopicPartition(t, p) for t in "ab" for p in range(4)}
    assert all(tp.topic == "a" for tp in owned[2])  # only subscribed topics
    for m in members:
        m.close()


def test_a_consumer_joins_its_group_at_first_use_like_kafka():
    transport = MemoryTransport()
    idle = transport.consumer(["t"], "g")  # created, never used: not a member
    with transport.consumer(["t"], "g") as active:
        assert len(active.assignment()) == 4
        idle.close()  # closing a member that never joined rebalances nothing
        assert len(active.assignment()) == 4


def test_no_partition_starves_under_small_batches():
    transport = MemoryTransport(MemoryBroker(partitions=2))
    producer = transport.producer()
    key0 = next(k for k in (f"k{i}".encode() for i in range(100)) if zlib.crc32(k) % 2 == 0)
    key1 = next(k for k in (f"k{i}".encode() for i in range(100)) if zlib.crc32(k) % 2 == 1)
    for _ in range(100):
        producer.send("t", b"busy", key=key0)
    producer.send("t", b"quiet", key=key1)
    with transport.consumer(["t"], "g") as consumer:
        values = [r.value for _ in range(3) for r in consumer.poll(0, 5)]
    assert b"quiet" in values


def test_closed_clients_refuse_work():
    transport = MemoryTransport()
    producer = transport.producer()
    producer.close()
    with pytest.raises(TransportError, match="closed"):
        producer.send("t", b"x")
    consumer = transport.consumer(["t"], "g")
    consumer.close()
    with pytest.raises(TransportError, match="closed"):
        consumer.commit({TopicPartition("t", 0): 1})
    with pytest.raises(TransportError, match="closed"):
        consumer.assignment()


def test_concurrent_producers_and_members_deliver_everything():
    transport = MemoryTransport()
    seen: list[bytes] = []
    lock = threading.Lock()
    stop = threading.Event()

    def produce(n: int) -> None:
        with transport.producer() as producer:
            for i in range(250):
                producer.send("t", f"{n}-{i}".encode(), key=f"{n}-{i}".encode())

    def consume() -> None:
        with transport.consumer(["t"], "g") as consumer:
            while not stop.is_set():
                records = consumer.poll(50, 20)
                with lock:
                    seen.extend(r.value for r in records)
                try:
                    consumer.commit(next_offsets(records))
                except TransportError:
                    pass  # rebalanced meanwhile: the new owner reads them again

    threads = [threading.Thread(target=consume) for _ in range(2)] + \
              [threading.Thread(target=produce, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    want = {f"{n}-{i}".encode() for n in range(4) for i in range(250)}
    while time.monotonic() < deadline and not want <= set(seen):
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join(10)
    assert set(seen) == want


def test_make_transport_picks_the_shared_memory_broker_or_kafka_without_connecting():
    assert make_transport(Settings()) is MemoryTransport.shared()
    from loraloop.transport.kafka import KafkaTransport

    kafka = make_transport(Settings(transport="kafka", kafka_bootstrap="127.0.0.1:1", kafka_api_version="0.9"))
    assert isinstance(kafka, KafkaTransport)
