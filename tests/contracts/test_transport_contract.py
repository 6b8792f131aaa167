"""One contract for every transport: the in-memory broker and real Kafka 0.9 behave the same.

The Kafka parameter runs against the session's real broker (``kafka_broker`` fixture); each
test uses its own topic (4 partitions) and its own consumer groups.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import defaultdict

import pytest

from loraloop.settings import Settings
from loraloop.transport import Record, Transport, TransportError, make_transport, next_offsets
from loraloop.transport.memory import MemoryTransport

PARTITIONS = 4


@pytest.fixture(params=["memory", pytest.param("kafka", marks=pytest.mark.integration)])
def transport(request: pytest.FixtureRequest) -> Transport:
    if request.param == "memory":
        return MemoryTransport()
    from loraloop.transport.kafka import KafkaTransport

    return KafkaTransport(request.getfixturevalue("kafka_settings")())


@pytest.fixture()
def topic(transport: Transport, request: pytest.FixtureRequest) -> str:
    name = f"t-{uuid.uuid4().hex[:8]}"
    if isinstance(transport, MemoryTransport):
        transport.broker.create_topic(name, PARTITIONS)
    else:
        request.getfixturevalue("kafka_broker").create_topic(name, PARTITIONS)
    return name


def _group() -> str:
    return f"g-{uuid.uuid4().hex[:8]}"


def _drain(consumer, want: int, timeout: float = 30.0) -> list[Record]:
    """Poll until ``want`` records arrived (or ``timeout``)."""
    out: list[Record] = []
    deadline = time.monotonic() + timeout
    while len(out) < want and time.monotonic() < deadline:
        out.extend(consumer.poll(timeout_ms=200, max_records=500))
    return out


def _quiet(consumer, settle_s: float = 1.0) -> list[Record]:
    """Whatever else arrives within ``settle_s``: used to show that nothing more is delivered."""
    out: list[Record] = []
    deadline = time.monotonic() + settle_s
    while time.monotonic() < deadline:
        out.extend(consumer.poll(timeout_ms=100, max_records=500))
    return out


def _join_all(*consumers, timeout: float = 30.0) -> None:
    """Poll every member until they split the partitions (Kafka rebalances inside poll)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for c in consumers:
            c.poll(50, 1)
        owned = [c.assignment() for c in consumers]
        if all(owned) and len(set().union(*owned)) == PARTITIONS and sum(map(len, owned)) == PARTITIONS:
            return
    raise AssertionError(f"members did not split the partitions within {timeout} s: "
                         f"{[sorted(c.assignment()) for c in consumers]}")


def _produce(transport: Transport, topic: str, values: list[bytes], keyed: bool = True) -> dict[bytes, tuple[int, int]]:
    """Send ``values`` (key = value when ``keyed``), flush, return value -> (partition, offset)."""
    with transport.producer() as producer:
        results = [(v, producer.send(topic, v, key=v if keyed else None)) for v in values]
        producer.flush(30)
        return {v: r.get(timeout=0) for v, r in results}


def _values(prefix: str, n: int) -> list[bytes]:
    return [f"{prefix}{i:03d}".encode() for i in range(n)]


def test_round_trip_keeps_order_within_a_partition(transport, topic):
    values = [f"{key}-{i:02d}".encode() for i in range(15) for key in ("a", "b", "c")]
    with transport.producer() as producer:
        sent = [(v, producer.send(topic, v, key=v[:1])) for v in values]
        producer.flush(30)
        where = {v: r.get(timeout=0) for v, r in sent}
    with transport.consumer([topic], _group()) as consumer:
        records = _drain(consumer, len(values))
        records += _quiet(consumer, 0.5)
    assert sorted(r.value for r in records) == sorted(values)  # each exactly once
    assert {r.value: (r.partition, r.offset) for r in records} == where  # SendResult names the record
    for key in (b"a", b"b", b"c"):
        mine = [r for r in records if r.key == key]
        assert len({r.partition for r in mine}) == 1  # one key, one partition
        by_offset = sorted(mine, key=lambda r: r.offset)
        assert [r.value for r in by_offset] == [v for v in values if v[:1] == key]  # in send order


def test_same_key_same_partition_across_producers(transport, topic):
    keys = [f"user-{i}".encode() for i in range(40)]
    with transport.producer() as first, transport.producer() as second:
        a = {k: first.send(topic, b"x", key=k) for k in keys}
        b = {k: second.send(topic, b"y", key=k) for k in keys}
        first.flush(30)
        second.flush(30)
        partitions = {k: a[k].get(timeout=0)[0] for k in keys}
        assert partitions == {k: b[k].get(timeout=0)[0] for k in keys}
    assert set(partitions.values()) == set(range(PARTITIONS))  # 40 keys reach every partition


def test_flush_acknowledges_every_send(transport, topic):
    with transport.producer() as producer:
        producer.flush(1)  # nothing sent yet: returns at once
        results = [producer.send(topic, f"v{i}".encode()) for i in range(50)]  # no key: any partition
        producer.flush(30)
        acknowledged = [r.get(timeout=0) for r in results]  # flushed: no waiting left
    assert len(set(acknowledged)) == 50
    assert all(0 <= p < PARTITIONS and o >= 0 for p, o in acknowledged)
    with transport.consumer([topic], _group()) as consumer:
        records = _drain(consumer, 50)
    assert {(r.partition, r.offset) for r in records} == set(acknowledged)


def test_commit_then_a_new_member_resumes_after_it(transport, topic):
    group = _group()
    _produce(transport, topic, _values("m", 20))
    with transport.consumer([topic], group) as first:
        records = _drain(first, 20)
        assert len(records) == 20
        by_partition: dict[int, list[Record]] = defaultdict(list)
        for r in records:
            by_partition[r.partition].append(r)
        # Commit the first half of each partition: the rest must come again, the half must not.
        done = [r for rs in by_partition.values() for r in sorted(rs, key=lambda r: r.offset)[: len(rs) // 2]]
        first.commit(next_offsets(done))
        assert sum(first.lag().values()) == 20 - len(done)
    assert 0 < len(done) < 20
    later = _produce(transport, topic, _values("n", 5))
    expected = {r.value for r in records} - {r.value for r in done} | set(later)
    with transport.consumer([topic], group) as second:
        again = _drain(second, len(expected))
        again += _quiet(second)
    assert sorted(r.value for r in again) == sorted(expected)


def test_uncommitted_records_are_redelivered_to_a_new_member(transport, topic):
    group = _group()
    values = _values("m", 8)
    _produce(transport, topic, values)
    with transport.consumer([topic], group) as first:
        assert sorted(r.value for r in _drain(first, 8)) == values  # polled, never committed
    with transport.consumer([topic], group) as second:
        again = _drain(second, 8)
        again += _quiet(second, 0.5)
    assert sorted(r.value for r in again) == values


def test_members_split_partitions_and_take_over_when_one_leaves(transport, topic):
    group = _group()
    a = transport.consumer([topic], group)
    b = transport.consumer([topic], group)
    try:
        _join_all(a, b)
        assert not (a.assignment() & b.assignment())
        where = _produce(transport, topic, _values("m", 40))
        b_partitions = {tp.partition for tp in b.assignment()}
        for_b = {v for v, (p, _) in where.items() if p in b_partitions}
        for_a = set(where) - for_b
        assert for_a and for_b  # 40 keys reach every partition

        got_a = _drain(a, len(for_a))
        a.commit(next_offsets(got_a))
        got_b = _drain(b, len(for_b))
        assert {r.value for r in got_a} == for_a  # each member reads only its own partitions
        assert {r.value for r in got_b} == for_b

        b.close()  # leaves without committing: its records go to a
        started = time.monotonic()
        taken_over = _drain(a, len(for_b), timeout=30)
        assert {tp.partition for tp in a.assignment()} == set(range(PARTITIONS))
        assert time.monotonic() - started < 15  # the leaving member is not waited out (session timeout)
        taken_over += _quiet(a, 0.5)
        assert sorted(r.value for r in taken_over) == sorted(for_b)  # a's committed records stay done
    finally:
        a.close()
        b.close()


def test_commit_of_a_partition_no_longer_owned_is_refused(transport, topic):
    group = _group()
    _produce(transport, topic, _values("m", 40))
    with transport.consumer([topic], group) as a:
        records = _drain(a, 40)
        assert len(a.assignment()) == PARTITIONS
        with transport.consumer([topic], group) as b:
            _join_all(a, b)
            with pytest.raises(TransportError, match="no longer owns"):
                a.commit(next_offsets(records))
            mine = [r for r in records if r.tp in a.assignment()]
            a.commit(next_offsets(mine))  # what a still owns it may commit
            assert all(a.lag()[tp] == 0 for tp in a.assignment())


def test_members_busy_between_polls_still_split_the_partitions(transport, topic):
    # A worker polls briefly and then runs a batch: a join round trip that completes while its
    # member is busy must count (kafka-python 3.0 dropped it, and a leader's rejoin restarted
    # the rebalance each time: kafka_join_fix).
    group = _group()
    _produce(transport, topic, _values("m", 8))
    with transport.consumer([topic], group) as a:
        _drain(a, 8)
        with transport.consumer([topic], group) as b:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                for c in (a, b):
                    c.poll(1, 1)
                owned = [c.assignment() for c in (a, b)]
                if all(owned) and len(set().union(*owned)) == PARTITIONS == sum(map(len, owned)):
                    break
                time.sleep(0.3)  # busy with a batch
            assert a.assignment() and b.assignment() and not (a.assignment() & b.assignment()), \
                [sorted(c.assignment()) for c in (a, b)]
            assert len(a.assignment() | b.assignment()) == PARTITIONS


def test_lag_counts_uncommitted_records(transport, topic):
    group = _group()
    _produce(transport, topic, _values("m", 6))
    with transport.consumer([topic], group) as consumer:
        records = _drain(consumer, 6)
        lag = consumer.lag()
        assert set(lag) == consumer.assignment()
        assert sum(lag.values()) == 6  # nothing committed yet
        first = min(records, key=lambda r: (r.partition, r.offset))
        consumer.commit(next_offsets([first]))
        assert consumer.lag()[first.tp] == lag[first.tp] - 1
        assert sum(consumer.lag().values()) == 5
        consumer.commit(next_offsets(records))
        assert sum(consumer.lag().values()) == 0


def test_a_closed_consumer_refuses_use(transport, topic):
    consumer = transport.consumer([topic], _group())
    consumer.poll(100, 1)
    consumer.close()
    consumer.close()  # idempotent
    with pytest.raises(TransportError, match="closed"):
        consumer.poll(100, 1)


def test_ping_answers(transport):
    assert transport.ping(timeout=5) is True


# --- Kafka only -------------------------------------------------------------------------


@pytest.mark.integration
def test_kafka_loses_nothing_across_a_broker_outage(kafka_broker, kafka_settings):
    """A producer and a consumer keep running while the broker stops and starts again.

    The application re-sends a batch whose flush failed (at least once); every record
    whose flush succeeded must reach the consumer, and the commits survive the restart.
    """
    from loraloop.transport.kafka import KafkaTransport

    transport = KafkaTransport(kafka_settings())
    topic, group = f"t-{uuid.uuid4().hex[:8]}", _group()
    kafka_broker.create_topic(topic, 2)
    acknowledged: set[bytes] = set()
    seen: set[bytes] = set()
    errors = {"flush": 0, "consumer": 0}
    stop_producing, stop_consuming = threading.Event(), threading.Event()

    def produce() -> None:
        with transport.producer() as producer:
            i = 0
            while not stop_producing.is_set():
                batch = _values(f"r{i:04d}-", 10)
                try:
                    for v in batch:
                        producer.send(topic, v, key=v)
                    producer.flush(30)
                except TransportError:
                    errors["flush"] += 1
                    time.sleep(0.2)
                    continue  # send the same batch again
                acknowledged.update(batch)
                i += 1
                time.sleep(0.02)

    consumer = transport.consumer([topic], group)

    def consume() -> None:
        while not stop_consuming.is_set():
            try:
                records = consumer.poll(200, 100)
                seen.update(r.value for r in records)
                consumer.commit(next_offsets(records))
            except TransportError:
                errors["consumer"] += 1  # uncommitted records come again
                time.sleep(0.2)

    threads = [threading.Thread(target=produce, daemon=True), threading.Thread(target=consume, daemon=True)]
    for t in threads:
        t.start()
    try:
        _wait(lambda: len(seen) >= 50, 30, "records before the outage")
        with transport.producer() as probe:
            probe.send(topic, b"probe", key=b"probe").get(timeout=10)  # metadata known: sends queue up
            kafka_broker.stop_broker()
            before = len(acknowledged)
            probe.send(topic, b"during-outage", key=b"during-outage")
            with pytest.raises(TransportError, match="flush"):
                probe.flush(1.0)  # the broker is down: flush says so instead of returning
            time.sleep(2)
            kafka_broker.start()
            probe.flush(60)  # the queued record goes out once the broker is back
        _wait(lambda: len(acknowledged) >= before + 100, 60, "records after the restart")
    finally:
        stop_producing.set()
        threads[0].join(60)
    _wait(lambda: acknowledged <= seen, 60, "every acknowledged record consumed")
    stop_consuming.set()
    threads[1].join(30)
    assert b"during-outage" in seen, errors  # the record queued while the broker was down
    assert acknowledged <= seen, (sorted(acknowledged - seen)[:10], errors)

    def committed_to_the_end() -> bool:  # the consumer's last commit may have met the outage: poll and commit again
        try:
            records = consumer.poll(200, 100)
            seen.update(r.value for r in records)
            consumer.commit(next_offsets(records))
            return sum(consumer.lag().values()) == 0
        except TransportError:
            return False

    _wait(committed_to_the_end, 30, "commits stored after the restart")
    consumer.close()


@pytest.mark.integration
def test_kafka_flush_reports_a_record_the_broker_refused(kafka_broker, kafka_settings):
    from loraloop.transport.kafka import KafkaTransport

    topic = f"t-{uuid.uuid4().hex[:8]}"
    with KafkaTransport(kafka_settings()).producer() as producer:
        producer.send(topic, b"fine").get(timeout=30)
        # Under the client's 1 MiB request limit, over the broker's message.max.bytes (1000012).
        refused = producer.send(topic, b"x" * 1_020_000)
        with pytest.raises(TransportError, match=r"1 record\(s\) were not delivered"):
            producer.flush(30)
        with pytest.raises(TransportError, match=f"send to {topic} failed"):
            refused.get(timeout=0)
        producer.send(topic, b"fine again")
        producer.flush(30)  # a failure is reported once


def _wait(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.mark.parametrize("version", ["zero.nine", "0.9.x", "latest"])
def test_bad_api_version_is_a_clear_error(version):
    from loraloop.transport.kafka import KafkaTransport

    settings = Settings(transport="kafka", kafka_api_version=version)
    with pytest.raises(ValueError, match=f"kafka_api_version must look like 0.9 or 2.8, got '{version}'"):
        KafkaTransport(settings)
    with pytest.raises(ValueError, match="kafka_api_version"):
        make_transport(settings)


def test_kafka_clients_are_created_lazily_and_ping_fails_fast_without_a_broker():
    from loraloop.transport.kafka import KafkaTransport

    transport = KafkaTransport(Settings(transport="kafka", kafka_bootstrap="127.0.0.1:1", kafka_api_version="0.9"))
    producer, consumer = transport.producer(), transport.consumer(["t"], "g")  # no connection yet
    producer.flush(1)  # nothing was sent
    producer.close()
    consumer.close()
    started = time.monotonic()
    assert transport.ping(timeout=0.5) is False
    assert time.monotonic() - started < 5


def test_kafka_client_config_passes_only_the_security_options_that_are_set():
    from loraloop.transport.kafka import client_config

    plain = client_config(Settings(kafka_bootstrap="a:9092, b:9093", kafka_api_version="2.8"))
    assert plain["bootstrap_servers"] == ["a:9092", "b:9093"]
    assert plain["api_version"] == (2, 8)
    assert not {"sasl_mechanism", "sasl_plain_username", "sasl_plain_password", "ssl_cafile"} & set(plain)
    assert "api_version" not in client_config(Settings())  # empty: negotiate
    secure = client_config(Settings(kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="PLAIN",
                                    kafka_sasl_username="u", kafka_sasl_password="p", kafka_ssl_cafile="/ca.pem"))
    assert secure["security_protocol"] == "SASL_SSL"
    assert (secure["sasl_mechanism"], secure["sasl_plain_username"], secure["sasl_plain_password"]) == ("PLAIN", "u", "p")
    assert secure["ssl_cafile"] == "/ca.pem" and "ssl_certfile" not in secure
