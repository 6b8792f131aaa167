"""Message contracts: every kind of bad input is refused with its reason."""

import json

import pytest

from loraloop.schemas import (
    DeadLetter,
    FeedbackEvent,
    InvalidMessage,
    Prediction,
    Request,
    TopLabel,
    decode_feedback,
    decode_request,
)


def _reason(raw, limit=100):
    with pytest.raises(InvalidMessage) as info:
        decode_request(raw, max_text_bytes=limit)
    return info.value.reason


def test_valid_request_round_trips():
    request = decode_request(Request(id="r1", text="hello", tenant="t").to_bytes(), max_text_bytes=100)
    assert (request.id, request.text, request.tenant) == ("r1", "hello", "t")


@pytest.mark.parametrize(("raw", "reason"), [
    (b"{not json", "malformed_json"),
    (b"\xff\xfe", "malformed_json"),
    (b"[1, 2]", "not_an_object"),
    (b'{"v": 99, "id": "a", "text": "x"}', "unsupported_version"),
    (b'{"text": "x"}', "missing_id"),
    (b'{"id": "", "text": "x"}', "missing_id"),
    (b'{"id": 5, "text": "x"}', "wrong_type"),
    (b'{"id": "a", "text": 5}', "wrong_type"),
    (b'{"id": "a", "text": "x", "ts": "yesterday"}', "wrong_type"),
    (b'{"id": "a"}', "wrong_type"),
    (b'{"id": "a", "text": ""}', "empty_text"),
    (b'{"id": "a", "text": "   "}', "empty_text"),
])
def test_bad_requests_are_refused_with_their_reason(raw, reason):
    assert _reason(raw) == reason


def test_text_over_the_byte_limit_is_refused():
    raw = json.dumps({"id": "a", "text": "é" * 60}).encode()  # 120 bytes in UTF-8
    assert _reason(raw, limit=100) == "oversize_text"
    assert decode_request(raw, max_text_bytes=120).text == "é" * 60


@pytest.mark.parametrize(("event", "reason"), [
    ({"request_id": "r", "kind": "label", "label": "x"}, "missing_id"),
    ({"event_id": "e", "request_id": "r", "kind": "meh"}, "invalid_kind"),
    ({"event_id": "e", "request_id": "r", "kind": "label"}, "missing_label"),
    ({"event_id": "e", "request_id": 3, "kind": "thumbs_up"}, "wrong_type"),
])
def test_bad_feedback_is_refused_with_its_reason(event, reason):
    with pytest.raises(InvalidMessage) as info:
        decode_feedback(json.dumps(event))
    assert info.value.reason == reason


def test_feedback_and_dead_letter_records():
    event = decode_feedback(FeedbackEvent(event_id="e", request_id="r", kind="thumbs_down").to_bytes())
    assert event.kind == "thumbs_down" and event.label is None
    error = InvalidMessage("empty_text", "text is empty")
    letter = DeadLetter.of(b'{"id": "a", "text": ""}', error, "requests", 2, 17)
    assert (letter.reason, letter.source_topic, letter.partition, letter.offset) == ("empty_text", "requests", 2, 17)
    prediction = Prediction(request_id="r", label="a", score=0.9, top_k=[TopLabel(label="a", score=0.9)],
                            adapter_version="v1", latency_ms=3.0)
    assert json.loads(prediction.to_bytes())["top_k"] == [{"label": "a", "score": 0.9}]
