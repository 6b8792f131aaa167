"""SIGKILL a real Redis (with AOF, and without persistence) while the ingester runs.

A writer plays the worker: it logs each served request to Redis (a failed write is counted,
as the worker counts ``request_log_errors``) and then produces feedback on it. Redis is
killed mid-stream and started again on the same port. Afterwards every feedback event must
be accounted for: buffered, dead-lettered with a reason a retry can act on
(``request_log_unavailable``), or, without persistence, counted as lost by
``loraloop_buffer_lost_total``; the feedback offsets are committed to the end.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from feedback.ingester import NotDurable, build_ingester
from loraloop.buffer import BufferError, make_feedback_buffer
from loraloop.buffer.redis import RedisRequestLog
from loraloop.metrics import Metrics
from loraloop.schemas import DeadLetter, FeedbackEvent, ServedRequest
from loraloop.settings import Settings
from loraloop.transport import TopicPartition
from loraloop.transport.memory import MemoryBroker, MemoryTransport
from tests.infra import InfraMissing, RedisServer

pytestmark = pytest.mark.integration

EVENTS = 600  # one every 20 ms: 12 s of traffic, Redis down from 2 s to 8 s
DOWN_S = 6.0  # longer than redis-py's retries (about 4.5 s), so that writes really fail


class KillableRedis(RedisServer):
    """A redis-server that can be SIGKILLed; ``persist=False`` runs it without AOF or snapshots."""

    def __init__(self, workdir: Path, persist: bool) -> None:
        super().__init__(workdir)
        self.persist = persist

    def start(self) -> None:
        if self.persist:
            return super().start()
        self._spawn([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
                     "--appendonly", "no", "--save", "", "--daemonize", "no"])
        import redis

        client = redis.Redis.from_url(self.url, socket_timeout=1)
        try:
            self.wait_until(client.ping, 20, f"redis on port {self.port}")
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final write."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(5)
        self.proc = None


@pytest.fixture()
def redis_factory(tmp_path: Path):
    servers: list[KillableRedis] = []

    def make(persist: bool) -> KillableRedis:
        try:
            server = KillableRedis(tmp_path / f"redis-{len(servers)}", persist)
        except InfraMissing as e:
            if os.environ.get("LORALOOP_REQUIRE_INFRA") == "1":
                pytest.fail(str(e), pytrace=False)
            pytest.skip(str(e))
        server.workdir.mkdir()
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


def _writer(settings: Settings, send, failed: set[int], done: threading.Event) -> None:
    """The worker's part: log the served request (no retries: a write fails while Redis is down), then feedback."""
    import redis

    log = RedisRequestLog(redis.Redis.from_url(settings.redis_url, socket_timeout=0.5, socket_connect_timeout=0.5),
                          settings.redis_prefix, 3600)
    skip_until = 0.0
    for i in range(EVENTS):
        served = ServedRequest(request_id=f"r{i}", text=f"text {i}", label="card", score=0.9, adapter_version="v1")
        if time.monotonic() < skip_until:
            failed.add(i)  # the worker skips the log for a second after a failure, and counts it
        else:
            try:
                log.record([served])
            except BufferError:
                failed.add(i)
                skip_until = time.monotonic() + 1.0
        event = FeedbackEvent(event_id=f"e{i}", request_id=f"r{i}", kind="thumbs_up")
        send(event)
        time.sleep(0.02)
    done.set()


class _Memory:
    """Feedback and dead letters on the in-memory broker."""

    def __init__(self, settings: Settings) -> None:
        self.settings, self.broker = settings, MemoryBroker(partitions=2)
        self.transport = MemoryTransport(self.broker)

    def send(self, event: FeedbackEvent) -> None:
        self.broker.append(self.settings.feedback_topic, event.request_id.encode(), event.to_bytes())

    def all_committed(self) -> bool:
        tps = [TopicPartition(self.settings.feedback_topic, p) for p in range(2)]
        return [self.broker.committed(self.settings.ingester_group, tp) for tp in tps] == [
            self.broker.end_offset(tp) for tp in tps]

    def dead_letters(self, expected: int) -> list[DeadLetter]:
        topic = self.settings.dead_letter_topic
        return [DeadLetter.model_validate_json(r.value) for p in range(self.broker.partitions(topic))
                for r in self.broker.read(TopicPartition(topic, p), 0, 10**6)]


class _Kafka(_Memory):
    """Feedback and dead letters on the real Kafka 0.9 broker."""

    def __init__(self, settings: Settings) -> None:
        from loraloop.transport import make_transport

        self.settings, self.transport = settings, make_transport(settings)
        self.producer = self.transport.producer()
        self._lock = threading.Lock()

    def send(self, event: FeedbackEvent) -> None:
        with self._lock:
            self.producer.send(self.settings.feedback_topic, event.to_bytes(), key=event.request_id.encode())

    def all_committed(self) -> bool:
        from tests.integration.test_feedback_real import _committed_and_ends

        with self._lock:
            self.producer.flush(timeout=30)
        committed, ends = _committed_and_ends(self.settings, 2)
        return committed == ends and sum(ends) == EVENTS

    def dead_letters(self, expected: int) -> list[DeadLetter]:
        from tests.integration.test_feedback_real import _dead_letters

        return _dead_letters(self.settings, expected)


def _run(redis_server: KillableRedis, kafka=None, **overrides: object):
    tag = uuid.uuid4().hex[:8]
    values = dict(redis_url=redis_server.url, feedback_topic=f"fb-{tag}", dead_letter_topic=f"dlq-{tag}",
                  ingester_group=f"g-{tag}", feedback_grace_s=0.5, feedback_store_retry_s=4.0, **overrides)
    if kafka is None:
        settings = Settings(**values)
        topics = _Memory(settings)
    else:
        broker, make_settings = kafka
        settings = make_settings(**values)
        broker.create_topic(settings.feedback_topic, 2)
        topics = _Kafka(settings)
    metrics = Metrics(CollectorRegistry())
    ingester = build_ingester(settings, transport=topics.transport, metrics=metrics)
    stop, done, failed = threading.Event(), threading.Event(), set()
    ingesting = threading.Thread(target=ingester.run, args=(stop,), daemon=True)
    ingesting.start()
    writing = threading.Thread(target=_writer, args=(settings, topics.send, failed, done), daemon=True)
    writing.start()
    time.sleep(2.0)  # a sixth of the stream is in
    redis_server.kill()
    time.sleep(DOWN_S)
    redis_server.start()
    assert done.wait(60), "the writer did not finish"
    deadline = time.monotonic() + 90
    while not topics.all_committed():
        assert time.monotonic() < deadline, "feedback offsets not committed to the end"
        assert ingesting.is_alive(), "the ingester stopped"
        time.sleep(0.5)
    stop.set()
    ingesting.join(timeout=30)
    buffered = {e.event_id for e in make_feedback_buffer(settings).claim("check", 10 * EVENTS).examples}
    letters = topics.dead_letters(EVENTS - len(buffered))
    lettered = {FeedbackEvent.model_validate_json(d.payload).event_id: d for d in letters}
    lost = metrics.registry.get_sample_value("loraloop_buffer_lost_total") or 0.0
    print(f"{EVENTS} events: {len(failed)} request-log writes failed, {len(buffered)} buffered, "
          f"{len(lettered)} dead-lettered {sorted({d.reason for d in lettered.values()})}, {lost:.0f} counted lost")
    return failed, buffered, lettered, lost


def test_sigkill_with_aof_loses_nothing(redis_factory) -> None:
    _check_aof(*_run(redis_factory(persist=True)))


def test_sigkill_with_aof_on_real_kafka_loses_nothing(redis_factory, kafka_broker, kafka_settings) -> None:
    _check_aof(*_run(redis_factory(persist=True), kafka=(kafka_broker, kafka_settings)))


def _check_aof(failed: set[int], buffered: set[str], lettered: dict[str, DeadLetter], lost: float) -> None:
    everyone = {f"e{i}" for i in range(EVENTS)}
    assert failed, "Redis was not down long enough for a request-log write to fail"
    assert buffered | set(lettered) == everyone and not buffered & set(lettered)
    assert lost == 0
    for event_id, letter in lettered.items():  # only feedback on requests whose log write failed, replayable
        assert letter.reason == "request_log_unavailable", (event_id, letter.reason, letter.detail)
        assert int(event_id[1:]) in failed
    assert {f"e{i}" for i in range(EVENTS) if i not in failed} <= buffered  # every logged request: joined
    assert len(failed) < EVENTS * 0.75  # traffic went on after the restart


def test_sigkill_without_persistence_is_refused_by_default(redis_factory) -> None:
    server = redis_factory(persist=False)
    settings = Settings(redis_url=server.url)
    with pytest.raises(NotDurable, match="appendonly no"):
        build_ingester(settings, transport=MemoryTransport(MemoryBroker())).run(threading.Event())


def test_sigkill_without_persistence_accounts_for_every_event_when_allowed(redis_factory) -> None:
    server = redis_factory(persist=False)
    failed, buffered, lettered, lost = _run(server, buffer_require_durable=False)
    assert not buffered & set(lettered)
    missing = EVENTS - len(buffered) - len(lettered)
    assert missing > 0, "nothing was buffered before the kill"
    assert lost == missing, f"{missing} events neither buffered nor dead-lettered, {lost} counted lost"
    assert all(d.reason == "request_log_unavailable" for d in lettered.values())
    assert {f"e{i}" for i in range(EVENTS) if i not in failed and i > EVENTS // 2} <= buffered  # after the restart
