"""One contract for every transport: the in-memory broker and real Kafka behave the same."""

from __future__ import annotations

import time
import uuid

import pytest

from loraloop.transport import Transport, TransportError, next_offsets
from loraloop.transport.memory import MemoryTransport


@pytest.fixture(params=["memory", pytest.param("kafka", marks=pytest.mark.integration)])
def transport(request) -> Transport:
    if request.param == "memory":
        return MemoryTransport()
    from loraloop.transport.kafka import KafkaTransport

    return KafkaTransport(request.getfixturevalue("kafka_settings")())


@pytest.fixture()
def topic(transport, request) -> str:
    name = f"t-{uuid.uuid4().hex[:8]}"
    if not isinstance(transport, MemoryTransport):
        request.getfixturevalue("kafka_broker").create_topic(name, 4)
    return name


def _drain(consumer, want: int, timeout: float = 30.0) -> list:
    out: list = []
    deadline = time.monotonic() + timeout
    while len(out) < want and time.monotonic() < deadline:
        out.extend(consumer.poll(timeout_ms=200, max_records=500))
    return out


def _produce(transport, topic, n, key=None):
    with transport.producer() as producer:
        for i in range(n):
            producer.send(topic, f"m{i}".encode(), key=key if key is not None else f"k{i}".encode())
        producer.flush(10)


def test_round_trip_keeps_order_within_a_partition(transport, topic):
    _produce(transport, topic, 20, key=b"same")
    with transport.consumer([topic], f"g-{uuid.uuid4().hex[:6]}") as consumer:
        records = _drain(consumer, 20)
    assert [r.value for r in records] == [f"m{i}".encode() for i in range(20)]
    assert len({r.partition for r in records}) == 1  # same key, same partition


def test_commit_then_a_new_member_resumes_after_it(transport, topic):
    group = f"g-{uuid.uuid4().hex[:6]}"
    _produce(transport, topic, 10)
    with transport.consumer([topic], group) as first:
        records = _drain(first, 10)
        done = sorted(records, key=lambda r: r.value)[:4]
        first.commit(next_offsets(records))
        assert sum(first.lag().values()) == 0
    _produce(transport, topic, 3)
    with transport.consumer([topic], group) as second:
        again = _drain(second, 3, timeout=20)
    assert sorted(r.value for r in again) == [b"m0", b"m1", b"m2"]
    assert done  # the first member did see records


def test_uncommitted_records_are_redelivered(transport, topic):
    group = f"g-{uuid.uuid4().hex[:6]}"
    _produce(transport, topic, 8)
    with transport.consumer([topic], group) as first:
        assert len(_drain(first, 8)) == 8  # polled, never committed
    with transport.consumer([topic], group) as second:
        assert sorted(r.value for r in _drain(second, 8)) == sorted(f"m{i}".encode() for i in range(8))


def test_members_split_partitions_and_take_over_when_one_leaves(transport, topic):
    group = f"g-{uuid.uuid4().hex[:6]}"
    a = transport.consumer([topic], group)
    b = transport.consumer([topic], group)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # Kafka assigns on poll
            a.poll(100, 1), b.poll(100, 1)
            if a.assignment() and b.assignment():
                break
        assert a.assignment() and b.assignment()
        assert not (a.assignment() & b.assignment())
        assert len(a.assignment() | b.assignment()) == 4
        _produce(transport, topic, 12)
        got_b = _drain(b, 1, timeout=10)
        b.close()  # leaves without committing: its records must reach a
        got_a = _drain(a, 12, timeout=40)
        assert len(a.assignment()) == 4
        assert {r.value for r in got_a} == {f"m{i}".encode() for i in range(12)}
        assert got_b or True  # b may or may not have polled before leaving; a gets everything either way
    finally:
        a.close()
        b.close()


def test_commit_of_a_partition_no_longer_owned_is_refused(transport, topic):
    if not isinstance(transport, MemoryTransport):
        pytest.skip("Kafka 0.9 only refuses such a commit after its session times out; covered in memory")
    group = f"g-{uuid.uuid4().hex[:6]}"
    _produce(transport, topic, 4)
    with transport.consumer([topic], group) as a:
        records = _drain(a, 4)
        with transport.consumer([topic], group) as b:
            b.poll(10, 1)
            with pytest.raises(TransportError, match="no longer owns"):
                a.commit(next_offsets(records))


def test_lag_counts_uncommitted_records(transport, topic):
    group = f"g-{uuid.uuid4().hex[:6]}"
    _produce(transport, topic, 6)
    with transport.consumer([topic], group) as consumer:
        records = _drain(consumer, 6)
        assert sum(consumer.lag().values()) == 6
        consumer.commit(next_offsets(records[:1]))
        assert sum(consumer.lag().values()) == 5


@pytest.mark.integration
def test_kafka_survives_a_broker_restart(kafka_broker, kafka_settings):
    from loraloop.transport.kafka import KafkaTransport

    transport = KafkaTransport(kafka_settings())
    topic = f"t-{uuid.uuid4().hex[:8]}"
    kafka_broker.create_topic(topic, 2)
    group = f"g-{uuid.uuid4().hex[:6]}"
    seen: set[bytes] = set()
    with transport.producer() as producer, transport.consumer([topic], group) as consumer:
        for i in range(10):
            producer.send(topic, f"a{i}".encode())
        producer.flush(10)
        records = _drain(consumer, 10)
        consumer.commit(next_offsets(records))
        seen.update(r.value for r in records)
        kafka_broker.restart()
        for i in range(10):
            producer.send(topic, f"b{i}".encode())
        producer.flush(60)
        deadline = time.monotonic() + 60
        while len(seen) < 20 and time.monotonic() < deadline:
            try:
                batch = consumer.poll(500, 100)
                consumer.commit(next_offsets(batch))
                seen.update(r.value for r in batch)
            except TransportError:
                time.sleep(0.5)  # coordinator moving after the restart: retry
    assert seen == {f"a{i}".encode() for i in range(10)} | {f"b{i}".encode() for i in range(10)}


def test_bad_api_version_is_a_clear_error():
    from loraloop.settings import Settings
    from loraloop.transport.kafka import KafkaTransport

    with pytest.raises(ValueError, match="kafka_api_version must look like"):
        KafkaTransport(Settings(transport="kafka", kafka_api_version="zero.nine"))
