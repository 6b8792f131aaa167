"""Fuzz the feedback ingester: arbitrary bytes, JSON and Unicode on the in-memory transport.

Each record must end as exactly one of: appended, duplicate, or one dead letter with a known
reason; the partition is committed to its end and the ingester goes on.
"""

from __future__ import annotations

import json
import time
import uuid

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from feedback.ingester import build_ingester
from loraloop.buffer.memory import MemoryFeedbackBuffer, MemoryRequestLog
from loraloop.metrics import Metrics
from loraloop.schemas import REASONS, DeadLetter, ServedRequest
from loraloop.settings import Settings
from loraloop.transport import TopicPartition
from loraloop.transport.memory import MemoryBroker, MemoryTransport

SERVED_IDS = ["r1", "r2", "\u00e9t\u00e9", "r\U0001f600"]
OUTCOMES = ("joined", "duplicate", "dead_letter")
KINDS = ("label", "thumbs_up", "thumbs_down", "invalid")

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)
_unicode = st.text(alphabet=st.characters(codec=None), max_size=30)  # lone surrogates included
_event_like = st.fixed_dictionaries(
    {"event_id": st.one_of(st.text(max_size=10), st.just("dup"), _unicode, st.integers()),
     "request_id": st.one_of(st.sampled_from(SERVED_IDS), _unicode, st.none()),
     "kind": st.one_of(st.sampled_from(["label", "thumbs_up", "thumbs_down"]), _unicode)},
    optional={"label": st.one_of(_unicode, st.sampled_from(["card", "billing", ""])),
              "ts": st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5)),
              "v": st.one_of(st.just(1), st.integers()), "tenant": _unicode, "extra": _json})


def _encode(obj: object) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")


_record = st.one_of(
    st.binary(max_size=200),
    _unicode.map(lambda t: t.encode("utf-8", "surrogatepass")),
    _json.map(_encode),
    _event_like.map(_encode),
    _event_like.map(lambda e: json.dumps(e).encode()),  # \ud800 escapes in ASCII JSON
    st.integers(1, 60_000).map(lambda n: b"[" * n),
    st.integers(1, 2_000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_record, min_size=1, max_size=12))
def test_every_record_ends_appended_duplicate_or_one_dead_letter(records: list[bytes]) -> None:
    tag = uuid.uuid4().hex[:8]
    config = Settings(feedback_topic=f"fb-{tag}", dead_letter_topic=f"dlq-{tag}", ingester_group=f"g-{tag}",
                      feedback_grace_s=0.0, feedback_store_retry_s=0.0)
    broker = MemoryBroker(partitions=2)
    log = MemoryRequestLog(3600)
    log.record([ServedRequest(request_id=i, text=f"text {i}", label="card", score=0.9, adapter_version="v1")
                for i in SERVED_IDS])
    buffer = MemoryFeedbackBuffer(max_items=5, trim="reject", replay_per_label=0, claim_idle_s=60, dedup_ttl_s=60)
    metrics = Metrics(CollectorRegistry())
    sent = [broker.append(config.feedback_topic, str(i % 3).encode(), raw) for i, raw in enumerate(records)]
    tps = [TopicPartition(config.feedback_topic, p) for p in range(2)]
    ingester = build_ingester(config, transport=MemoryTransport(broker), request_log=log, buffer=buffer,
                              metrics=metrics)
    with ingester:
        deadline = time.monotonic() + 20
        while [broker.committed(config.ingester_group, tp) for tp in tps] != [broker.end_offset(tp) for tp in tps]:
            assert time.monotonic() < deadline, "the ingester stalled"
            ingester.poll_once(timeout_ms=10)
    letters = [DeadLetter.model_validate_json(r.value) for p in range(broker.partitions(config.dead_letter_topic))
               for r in broker.read(TopicPartition(config.dead_letter_topic, p), 0, 10**6)]
    where = [(d.partition, d.offset) for d in letters]
    assert len(where) == len(set(where)), "a record was dead-lettered twice"
    assert set(where) <= set(sent)
    assert all(d.reason in REASONS and d.detail for d in letters)
    resolved = sum(metrics.registry.get_sample_value("loraloop_feedback_events_total",
                                                     {"kind": k, "outcome": o}) or 0.0
                   for k in KINDS for o in OUTCOMES)
    assert resolved == len(records), f"{resolved} outcomes for {len(records)} records"
    joined = sum(metrics.registry.get_sample_value("loraloop_feedback_events_total",
                                                   {"kind": k, "outcome": "joined"}) or 0.0 for k in KINDS)
    assert joined == buffer.depth()
    for letter in letters:
        letter.to_bytes()  # every dead letter serializes (no lone surrogate left in it)
