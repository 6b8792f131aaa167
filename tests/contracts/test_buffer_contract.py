"""One contract for the feedback buffer and request log: in-memory and real Redis."""

from __future__ import annotations

import time

import pytest

from loraloop.buffer.memory import MemoryFeedbackBuffer, MemoryRequestLog
from loraloop.schemas import Example, ServedRequest


def _example(i: int, label: str | None = "a", kind: str = "label") -> Example:
    return Example(event_id=f"e{i}", request_id=f"r{i}", text=f"text {i}", kind=kind, label=label,
                   negative_label="b" if label is None else None, served_label="b", adapter_version="v1")


def _make(backend: str, request, ttl_s: int = 60, redis_url: str | None = None, **kw):
    args = dict(max_items=100, trim="reject", replay_per_label=3, claim_idle_s=30.0, dedup_ttl_s=60)
    args.update(kw)
    if backend == "memory":
        return MemoryFeedbackBuffer(**args), MemoryRequestLog(ttl_s=ttl_s)
    from loraloop.buffer.redis import RedisFeedbackBuffer, RedisRequestLog, connect

    client = connect(redis_url or request.getfixturevalue("redis_url"))
    return (RedisFeedbackBuffer(client, "test", **args),
            RedisRequestLog(client, "test", ttl_s))


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.integration)])
def backend(request):
    return request.param


def test_append_claim_acknowledge(backend, request):
    buffer, _ = _make(backend, request)
    for i in range(5):
        assert buffer.append(_example(i)) == "appended"
    assert (buffer.depth(), buffer.pending()) == (5, 5)
    claim = buffer.claim("learner-1", 3)
    assert [e.event_id for e in claim.examples] == ["e0", "e1", "e2"]
    assert (buffer.depth(), buffer.pending()) == (5, 2)
    buffer.acknowledge(claim)
    assert (buffer.depth(), buffer.pending()) == (2, 2)
    assert [e.event_id for e in buffer.claim("learner-1", 10).examples] == ["e3", "e4"]


def test_duplicate_event_ids_are_kept_once(backend, request):
    buffer, _ = _make(backend, request)
    assert buffer.append(_example(1)) == "appended"
    assert buffer.append(_example(1)) == "duplicate"
    assert buffer.depth() == 1


def test_bounded_with_reject_and_drop_oldest(backend, request):
    buffer, _ = _make(backend, request, max_items=3)
    assert [buffer.append(_example(i)) for i in range(4)] == ["appended"] * 3 + ["full"]
    assert buffer.depth() == 3
    dropping, _ = _make(backend, request, max_items=3, trim="drop_oldest")
    if backend == "redis":
        dropping.prefix, dropping.stream = "test2", "test2:feedback:stream"
    for i in range(10, 15):
        assert dropping.append(_example(i)) == "appended"
    assert dropping.depth() == 3
    assert [e.event_id for e in dropping.claim("l", 10).examples] == ["e12", "e13", "e14"]
    assert dropping.take_dropped() == {"drop_oldest": 2}  # counted, and the tally resets
    assert dropping.take_dropped() == {}
    assert buffer.take_dropped() == {}  # reject drops nothing


def test_unacknowledged_claims_come_back(backend, request):
    buffer, _ = _make(backend, request, claim_idle_s=0.3)
    for i in range(3):
        buffer.append(_example(i))
    lost = buffer.claim("learner-killed", 10)
    assert len(lost.examples) == 3
    assert buffer.claim("learner-2", 10).examples == []  # still claimed
    time.sleep(0.5)
    again = buffer.claim("learner-2", 10)
    assert sorted(e.event_id for e in again.examples) == ["e0", "e1", "e2"]
    buffer.acknowledge(again)
    assert buffer.depth() == 0


def test_replay_reservoir_is_label_balanced_and_seeded(backend, request):
    buffer, _ = _make(backend, request)
    labels = ["a"] * 20 + ["b"] * 4 + ["c"] * 2
    for i, label in enumerate(labels):
        buffer.append(_example(i, label))
    buffer.append(_example(99, None, kind="thumbs_down"))
    buffer.acknowledge(buffer.claim("l", 100))
    sample = buffer.replay_sample(6, seed=7)
    assert sorted(e.label for e in sample) == ["a", "a", "b", "b", "c", "c"]  # 3 per label kept, balanced draw
    assert [e.event_id for e in sample] == [e.event_id for e in buffer.replay_sample(6, seed=7)]
    assert all(e.label is not None for e in buffer.replay_sample(100, seed=1))  # thumbs-down not replayed


def test_quarantined_claim_is_dropped_without_entering_the_reservoir(backend, request):
    buffer, _ = _make(backend, request)
    for i in range(4):
        buffer.append(_example(i, "a"))
    buffer.acknowledge(buffer.claim("l", 2), remember=False)
    assert buffer.replay_sample(10, seed=0) == []
    assert (buffer.depth(), buffer.pending()) == (2, 2)  # gone from the queue all the same
    buffer.acknowledge(buffer.claim("l", 2))
    assert sorted(e.event_id for e in buffer.replay_sample(10, seed=0)) == ["e2", "e3"]


def test_quarantined_examples_of_a_claim_stay_out_of_the_reservoir(backend, request):
    buffer, _ = _make(backend, request)
    for i in range(4):
        buffer.append(_example(i, "a"))
    buffer.acknowledge(buffer.claim("l", 4), quarantine={"e1", "e3"})
    assert (buffer.depth(), buffer.pending()) == (0, 0)
    assert sorted(e.event_id for e in buffer.replay_sample(10, seed=0)) == ["e0", "e2"]


def test_released_examples_come_back_unclaimed_and_are_not_remembered(backend, request):
    buffer, _ = _make(backend, request, replay_per_label=10)
    for i in range(5):
        buffer.append(_example(i, "a"))
    claim = buffer.claim("l", 5)
    buffer.acknowledge(claim, quarantine={"e0"}, release={"e1", "e3"})
    assert (buffer.depth(), buffer.pending()) == (2, 2)  # waiting for the next claim, not held by this one
    assert sorted(e.event_id for e in buffer.replay_sample(10, seed=0)) == ["e2", "e4"]
    again = buffer.claim("l", 5)
    assert sorted(e.event_id for e in again.examples) == ["e1", "e3"]
    assert again.examples[0].text == claim.examples[1].text  # the example itself, not a stub
    buffer.acknowledge(again)
    assert (buffer.depth(), buffer.pending()) == (0, 0)
    assert sorted(e.event_id for e in buffer.replay_sample(10, seed=0)) == ["e1", "e2", "e3", "e4"]


def test_a_claim_acknowledged_twice_releases_nothing_twice(backend, request):
    buffer, _ = _make(backend, request)
    for i in range(3):
        buffer.append(_example(i, "a"))
    claim = buffer.claim("l", 3)
    buffer.acknowledge(claim, release={"e2"})
    buffer.acknowledge(claim, release={"e2"})  # a retried acknowledgement must not duplicate e2
    assert (buffer.depth(), buffer.pending()) == (1, 1)
    assert [e.event_id for e in buffer.claim("l", 3).examples] == ["e2"]


def test_remember_seeds_the_reservoir_without_queueing(backend, request):
    buffer, _ = _make(backend, request)
    buffer.remember([_example(i, "ab"[i % 2]) for i in range(6)] + [_example(50, None, kind="thumbs_down")])
    assert buffer.depth() == 0 and buffer.pending() == 0
    assert sorted(e.label for e in buffer.replay_sample(4, seed=0)) == ["a", "a", "b", "b"]


def test_request_log_round_trip_and_expiry(backend, request):
    _, log = _make(backend, request, ttl_s=1)
    served = ServedRequest(request_id="r1", text="hello", label="a", score=0.9, adapter_version="v1")
    log.record([served])
    assert log.get("r1") == served
    assert log.get("nope") is None
    time.sleep(2.1)
    assert log.get("r1") is None


@pytest.mark.integration
def test_redis_restart_between_claim_and_acknowledge(redis_server, redis_url):
    from loraloop.buffer.redis import RedisFeedbackBuffer, connect

    buffer = RedisFeedbackBuffer(connect(redis_url), "restart", max_items=100, trim="reject", replay_per_label=5,
                                 claim_idle_s=0.2, dedup_ttl_s=60)
    for i in range(4):
        buffer.append(_example(i))
    claim = buffer.claim("l1", 10)
    redis_server.restart()
    buffer.acknowledge(claim)  # reconnects; the pending list survived the restart
    assert buffer.depth() == 0
    assert len(buffer.replay_sample(10, 0)) == 4
    for i in range(4, 6):
        buffer.append(_example(i))
    lost = buffer.claim("l1", 10)
    redis_server.restart()
    time.sleep(0.3)
    assert sorted(e.event_id for e in buffer.claim("l2", 10).examples) == sorted(e.event_id for e in lost.examples)


def test_batched_append_and_lookup_match_the_single_ones(backend, request):
    buffer, log = _make(backend, request, max_items=4)
    batch = [_example(1), _example(2), _example(1), _example(3), _example(4), _example(5)]
    assert buffer.append_many(batch) == ["appended", "appended", "duplicate", "appended", "appended", "full"]
    assert buffer.append_many([]) == []
    assert buffer.append(_example(5)) == "full"  # a refused event is not remembered as seen
    assert buffer.depth() == 4
    log.record([ServedRequest(request_id=f"r{i}", text="t", label="a", score=0.5, adapter_version="v1")
                for i in (1, 2)])
    assert sorted(log.get_many(["r1", "r2", "r9", "r1"])) == ["r1", "r2"]
    assert log.get_many([]) == {}


def test_retention_drops_old_text_from_queue_claims_and_reservoir(backend, request):
    buffer, _ = _make(backend, request, retention_s=1.0)
    buffer.append(_example(0))
    buffer.append(_example(1))
    held = buffer.claim("learner-1", 1)  # claimed, never acknowledged: its text must expire too
    assert [e.event_id for e in held.examples] == ["e0"]
    buffer.remember([_example(5, "a")])
    assert len(buffer.replay_sample(10, seed=0)) == 1
    time.sleep(1.3)
    assert buffer.append(_example(2)) == "appended"
    assert buffer.depth() == 1 and buffer.pending() == 1
    assert buffer.replay_sample(10, seed=0) == []
    assert [e.event_id for e in buffer.claim("learner-2", 10).examples] == ["e2"]
    assert buffer.take_dropped() == {"retention": 2, "replay_retention": 1}


def test_retention_keeps_recent_entries(backend, request):
    buffer, _ = _make(backend, request, retention_s=30.0)
    for i in range(3):
        buffer.append(_example(i))
    buffer.acknowledge(buffer.claim("l", 1))
    assert buffer.depth() == 2 and len(buffer.replay_sample(10, seed=0)) == 1
    assert buffer.take_dropped() == {}


def test_durability_is_reported(backend, request):
    buffer, _ = _make(backend, request)
    durability = buffer.durability()
    assert durability.durable and durability.detail
    assert durability.mode == ("memory" if backend == "memory" else "aof_always")  # the test server fsyncs always


@pytest.mark.integration
def test_durability_probe_without_aof_and_without_config(redis_url):
    import redis

    from loraloop.buffer.redis import connect, probe_durability

    client = connect(redis_url)
    client.config_set("appendonly", "no")
    try:
        durability = probe_durability(client)
        assert (durability.mode, durability.durable) == ("none", False) and "appendonly no" in durability.detail
    finally:
        client.config_set("appendonly", "yes")

    class NoConfig(redis.Redis):  # a managed Redis that renamed CONFIG away
        def config_get(self, *args, **kwargs):
            raise redis.ResponseError("unknown command 'CONFIG'")

    fallback = probe_durability(NoConfig.from_url(redis_url))
    assert fallback.mode == "aof_everysec" and "read by INFO" in fallback.detail


@pytest.mark.integration
def test_appends_wait_for_fsync_or_a_replica(redis_url, monkeypatch):
    import loraloop.buffer.redis as module
    from loraloop.buffer import BufferError, Durability

    buffer, _ = _make("redis", None, redis_url=redis_url)
    buffer._durability = Durability("replica", True)  # real WAIT: this server has no replica
    monkeypatch.setattr(module, "WAIT_TIMEOUT_MS", 100)
    with pytest.raises(BufferError, match="no replica confirmed the appends within 100 ms"):
        buffer.append(_example(1))
    assert buffer.append(_example(1)) == "duplicate"  # it is there, only not confirmed: a retry resolves it
    sent = []
    real = buffer.client.execute_command

    def waitaof(*args, **kwargs):  # Redis 7.0 has no WAITAOF: answer as 7.2 does, fsynced locally or not
        if args[0] == "WAITAOF":
            sent.append(args)
            return [len(sent) - 1, 0]
        return real(*args, **kwargs)

    monkeypatch.setattr(buffer.client, "execute_command", waitaof)
    buffer._durability = Durability("waitaof", True)
    with pytest.raises(BufferError, match="WAITAOF answered 0"):
        buffer.append(_example(2))
    assert buffer.append(_example(3)) == "appended" and sent == [("WAITAOF", 1, 0, 100)] * 2
    assert buffer.append(_example(3)) == "duplicate" and len(sent) == 2  # nothing new appended: no wait
