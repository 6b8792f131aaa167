"""Fuzzing the decoders and the worker: whatever arrives, one answer or one dead letter, never a crash.

Hypothesis throws arbitrary bytes, arbitrary JSON (nested, with NaN, huge numbers and lone
surrogates, escaped or raw) and request-shaped objects with arbitrary Unicode at
``decode_request`` and ``decode_feedback``: each input either decodes to a record whose
serializations all succeed, or raises :class:`InvalidMessage` with a reason in
:data:`REASONS`. The same inputs through an in-memory worker end as exactly one
prediction or one dead letter each.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraloop.schemas import (
    REASONS,
    DeadLetter,
    Example,
    FeedbackEvent,
    InvalidMessage,
    Prediction,
    Request,
    ServedRequest,
    TopLabel,
    decode_feedback,
    decode_request,
)
from loraloop.testing import save_tiny_base_model
from loraloop.transport import TopicPartition
from services.worker import InferenceWorker
from tests.test_worker_memory import LABELS, Stack, _PoisonTokenizer, serve_until, swap_to

pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")  # big inputs, big reprs
MAX_TEXT_BYTES = 300
POISON_WORD = "tokenizer-chokes"  # the worker's tokenizer raises on texts containing it

# Any code point; and often a lone surrogate (U+D800..U+DFFF) somewhere in the string, which chance alone
# rarely produces. Two adjacent ones may form a valid pair once escaped and parsed: that case is wanted too.
_surrogate = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
_plain = st.text(max_size=40)
_unicode = st.one_of(_plain, _plain, _plain, _plain, _plain,
                     st.builds(lambda a, c, b: a + c + b, st.text(max_size=10), _surrogate, st.text(max_size=10)),
                     st.lists(st.one_of(st.characters(), _surrogate), max_size=8).map("".join))
_number = st.one_of(st.integers(), st.integers(min_value=10**300, max_value=10**400), st.floats())
# Integers over Python's 4,300-digit conversion limit, written straight into the JSON text.
_huge_int = st.builds(lambda n, field: b'{"id": "a", "text": "x", "%s": %s}' % (field, b"9" * n),
                      st.integers(4000, 6000), st.sampled_from([b"ts", b"extra", b"id"]))
_scalar = st.one_of(st.none(), st.booleans(), _number, _unicode)
_json_value = st.recursive(_scalar, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.one_of(_plain, _plain, _unicode), kids, max_size=4),
                           max_leaves=25)
_plain_id = st.text(st.characters(codec="ascii"), min_size=1, max_size=12)
# Mostly well-formed fields, so that most records get past the envelope and their strings are what is tested.
_id = st.one_of(_plain_id, _plain_id, _unicode, _json_value)
_text = st.one_of(st.text(max_size=60), _unicode, _unicode, st.just("  "), st.text(min_size=290, max_size=320),
                  st.just(f"please {POISON_WORD} now"), _json_value)
_request_shaped = st.fixed_dictionaries(
    {"id": _id, "text": _text},
    optional={"tenant": st.one_of(_unicode, st.text(min_size=199, max_size=210), _json_value),
              "ts": st.one_of(_number, _number, _unicode), "v": st.one_of(st.just(1), st.just(1), st.integers(-2, 3)),
              "extra": _json_value})
# A valid request, or one with a single field given a lone surrogate: the poison hidden among valid traffic.
_valid_request = st.fixed_dictionaries(
    {"id": _plain_id, "text": st.one_of(*[st.text(min_size=1, max_size=60).filter(str.strip)] * 3,
                                        st.just(f"please {POISON_WORD} now"))},
    optional={"tenant": st.text(max_size=20), "ts": st.floats(0, 2e9)})
_near_valid_request = st.builds(
    lambda obj, field, poison, poisoned: {**obj, field: obj.get(field, "") + poison} if poisoned else obj,
    _valid_request, st.sampled_from(["id", "text", "tenant", "extra"]), _surrogate, st.booleans())
_kind = st.one_of(st.sampled_from(["label", "thumbs_up", "thumbs_down"]), _unicode)
_feedback_shaped = st.fixed_dictionaries(
    {"event_id": _id, "request_id": _id, "kind": _kind},
    optional={"label": st.one_of(_unicode, _unicode, _json_value), "tenant": _unicode, "ts": _number,
              "extra": _json_value})
_valid_feedback = st.fixed_dictionaries(
    {"event_id": _plain_id, "request_id": _plain_id, "kind": st.sampled_from(["thumbs_up", "thumbs_down"])},
    optional={"label": st.text(min_size=1, max_size=20), "tenant": st.text(max_size=20)})
_near_valid_feedback = st.builds(
    lambda obj, field, poison, poisoned: {**obj, field: obj.get(field, "") + poison} if poisoned else obj,
    _valid_feedback, st.sampled_from(["event_id", "request_id", "label", "tenant"]), _surrogate, st.booleans())
_deep = st.builds(lambda n, opener, tail: (opener * n + tail).encode(), st.integers(0, 60_000),
                  st.sampled_from(["[", '{"a":', '[{"b":']), st.sampled_from(["", "]", "1", '"x"']))


def _encodings(obj: object) -> st.SearchStrategy[bytes | str]:
    """One JSON document, written the ways a producer might: ASCII-escaped or raw, as str or bytes."""
    escaped = json.dumps(obj)
    raw = json.dumps(obj, ensure_ascii=False)
    return st.sampled_from([escaped, escaped.encode(), raw, raw.encode("utf-8", errors="surrogatepass")])


def _inputs(*shaped: st.SearchStrategy[dict]) -> st.SearchStrategy[bytes | str]:
    """Arbitrary bytes, arbitrary JSON, deep nesting, huge numbers, cut documents, and (mostly) ``shaped`` ones."""
    doc = st.one_of(*shaped, *shaped, _json_value).flatmap(_encodings)
    cut = st.builds(lambda d, junk: _as_bytes(d)[: len(_as_bytes(d)) // 2] + junk, doc, st.binary(max_size=20))
    return st.one_of(doc, doc, doc, st.binary(max_size=200), _deep, cut, _huge_int)

def _as_bytes(raw: bytes | str) -> bytes:
    return raw if isinstance(raw, bytes) else raw.encode("utf-8", errors="surrogatepass")


_requests = _inputs(_request_shaped, _near_valid_request)
_feedback = _inputs(_feedback_shaped, _near_valid_feedback)


def _assert_serializable_request(request: Request) -> None:
    """Everything the worker makes from a request serializes: the request, its prediction, its log entry."""
    request.to_bytes()
    request.id.encode("utf-8")  # the predictions' Kafka key
    prediction = Prediction(request_id=request.id, label="a", score=1.0, top_k=[TopLabel(label="a", score=1.0)],
                            adapter_version="v1", latency_ms=0.0, tenant=request.tenant)
    assert Prediction.model_validate_json(prediction.to_bytes()) == prediction
    ServedRequest(request_id=request.id, text=request.text, label="a", score=1.0, adapter_version="v1",
                  tenant=request.tenant).to_bytes()
    assert len(request.text.encode("utf-8")) <= MAX_TEXT_BYTES and request.text.strip()


def _assert_refusal(raw: bytes | str, error: InvalidMessage) -> None:
    assert error.reason in REASONS
    assert error.reason != "decode_error", f"an unexpected exception reached the catch-all: {error.detail}"
    for redact in (False, True):  # its dead letter serializes too, redacted or not
        letter = DeadLetter.of(raw, error, "topic", 0, 1, redact=redact, key=b"k")
        assert DeadLetter.model_validate_json(letter.to_bytes()).reason == error.reason


@settings(max_examples=400, deadline=None)
@given(_requests)
def test_decode_request_returns_a_serializable_request_or_a_reason(raw: bytes | str) -> None:
    try:
        request = decode_request(raw, max_text_bytes=MAX_TEXT_BYTES)
    except InvalidMessage as e:
        _assert_refusal(raw, e)
    else:
        _assert_serializable_request(request)


@settings(max_examples=400, deadline=None)
@given(_feedback)
def test_decode_feedback_returns_a_serializable_event_or_a_reason(raw: bytes | str) -> None:
    try:
        event = decode_feedback(raw)
    except InvalidMessage as e:
        _assert_refusal(raw, e)
    else:
        assert FeedbackEvent.model_validate_json(event.to_bytes()) == event
        for field in (event.event_id, event.request_id, event.label or "", event.tenant or ""):
            field.encode("utf-8")
        Example(event_id=event.event_id, request_id=event.request_id, text="t", kind=event.kind, label=event.label,
                served_label="a", adapter_version="v1").to_bytes()


@settings(max_examples=150, deadline=None)
@given(_request_shaped)
def test_request_shaped_objects_with_any_unicode(obj: dict) -> None:
    for raw in (json.dumps(obj), json.dumps(obj).encode(), json.dumps(obj, ensure_ascii=False)):
        try:
            request = decode_request(raw, max_text_bytes=MAX_TEXT_BYTES)
        except InvalidMessage as e:
            _assert_refusal(raw, e)
        else:
            _assert_serializable_request(request)


# --- through the worker -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, InferenceWorker]]:
    root = tmp_path_factory.mktemp("fuzz-worker")
    stack = Stack(root, save_tiny_base_model(root / "base"), max_text_bytes=MAX_TEXT_BYTES)
    stack.registry.promote(stack.publish(LABELS, "a"))
    with stack.worker(tokenizer=_PoisonTokenizer(stack.tokenizer, POISON_WORD)) as worker:
        swap_to(worker, stack.registry.active().version)
        yield stack, worker


def _ends(stack: Stack, topic: str) -> dict[int, int]:
    broker = stack.transport.broker
    return {p: broker.end_offset(TopicPartition(topic, p)) for p in range(broker.partitions(topic))}


def _read_since(stack: Stack, topic: str, since: dict[int, int]) -> list[bytes]:
    broker = stack.transport.broker
    return [r.value for p, start in since.items() for r in broker.read(TopicPartition(topic, p), start, 10**9)]


def _expected(raw: bytes) -> str | Request:
    """What the worker must make of ``raw``: the decoded request, or the reason of its dead letter."""
    try:
        request = decode_request(raw, max_text_bytes=MAX_TEXT_BYTES)
    except InvalidMessage as e:
        return e.reason
    return "inference_error" if POISON_WORD in request.text else request


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(_near_valid_request.flatmap(_encodings), _requests).map(_as_bytes), min_size=1, max_size=12))
def test_every_record_through_the_worker_ends_as_one_prediction_or_one_dead_letter(
        served: tuple[Stack, InferenceWorker], raws: list[bytes]) -> None:
    stack, worker = served
    s = stack.settings
    since_predictions, since_letters = _ends(stack, s.predictions_topic), _ends(stack, s.dead_letter_topic)
    positions = [stack.producer.send(s.requests_topic, raw, key=b"one-batch").get() for raw in raws]
    serve_until(worker, lambda: stack.committed() == stack.ends(), timeout=30)
    predictions = [Prediction.model_validate_json(v) for v in _read_since(stack, s.predictions_topic, since_predictions)]
    letters = [DeadLetter.model_validate_json(v) for v in _read_since(stack, s.dead_letter_topic, since_letters)]
    assert len(predictions) + len(letters) == len(raws)  # exactly one outcome per record
    expected = {position: _expected(raw) for position, raw in zip(positions, raws, strict=True)}
    refused = {pos: reason for pos, reason in expected.items() if isinstance(reason, str)}
    assert {(d.partition, d.offset): d.reason for d in letters} == refused
    answered = Counter(r.id for r in expected.values() if isinstance(r, Request))
    assert Counter(p.request_id for p in predictions) == answered
    assert all(p.adapter_version == worker.active_version and p.latency_ms >= 0 for p in predictions)


def test_the_fuzz_worker_fixture_really_dead_letters_the_poison_word(served: tuple[Stack, InferenceWorker]) -> None:
    stack, worker = served
    since = _ends(stack, stack.settings.dead_letter_topic)
    stack.producer.send(stack.settings.requests_topic, Request(id="p", text=f"a {POISON_WORD} b").to_bytes())
    serve_until(worker, lambda: stack.committed() == stack.ends())
    [letter] = [DeadLetter.model_validate_json(v) for v in _read_since(stack, stack.settings.dead_letter_topic, since)]
    assert letter.reason == "inference_error"
