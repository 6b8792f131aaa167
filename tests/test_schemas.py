"""Message contracts: every kind of bad input is refused with its reason."""

import hashlib
import hmac
import json

import pytest

from loraloop.schemas import (
    DEAD_LETTER_PAYLOAD_CHARS,
    MAX_JSON_DEPTH,
    MAX_RECORD_BYTES,
    REASONS,
    DeadLetter,
    FeedbackEvent,
    InvalidMessage,
    Prediction,
    Request,
    TopLabel,
    decode_feedback,
    decode_request,
    payload_digest,
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


# --- poison input: whatever the bytes, InvalidMessage with a reason, never another exception ------------------

def _deep(n: int, open_: str = "[", close: str = "]") -> bytes:
    return (open_ * n + close * n).encode()


@pytest.mark.parametrize(("raw", "reason"), [
    (rb'{"id": "a", "text": "bad \ud800 text"}', "invalid_unicode"),  # escaped lone surrogate
    (rb'{"id": "a\udfff", "text": "x"}', "invalid_unicode"),
    (rb'{"id": "a", "text": "x", "tenant": "\ud800"}', "invalid_unicode"),
    (rb'{"id": "a", "text": "x", "extra": {"\udc00": 1}}', "invalid_unicode"),  # even in a key of an ignored field
    ('{"id": "a", "text": "raw \ud800"}', "invalid_unicode"),  # a str argument holding the surrogate itself
    (b'{"id": "a", "text": "raw \xed\xa0\x80"}', "invalid_unicode"),  # json.loads decodes with surrogatepass
    (_deep(50_000), "too_deep"),
    (b"[" * 50_000, "too_deep"),  # unclosed
    (_deep(50_000, "{\"a\":", "}"), "too_deep"),
    (b'{"id": "a", "text": "x", "extra": ' + _deep(33) + b"}", "too_deep"),
    (b'{"id": "a", "text": "x", "n": ' + b"1" * 5000 + b"}", "malformed_json"),  # over Python's int digit limit
    (b'{"id": "a", "text": "x", "ts": NaN}', "wrong_type"),
    (b'{"id": "a", "text": "x", "ts": -Infinity}', "wrong_type"),
    (b'{"id": "a", "text": "x", "ts": 1e999}', "wrong_type"),  # parses to inf
    (json.dumps({"id": "a", "text": "x", "tenant": "t" * 201}).encode(), "wrong_type"),
    (b'{"id": "a", "text": "' + b"x" * (1 << 20) + b'"}', "oversize_record"),
])
def test_poison_requests_are_refused_with_their_reason(raw, reason):
    with pytest.raises(InvalidMessage) as info:
        decode_request(raw, max_text_bytes=100)
    assert info.value.reason == reason
    assert info.value.reason in REASONS


def test_the_refusal_names_the_offending_field_and_code_point():
    with pytest.raises(InvalidMessage, match=r"tenant holds a lone surrogate U\+D800 at index 2"):
        decode_request(rb'{"id": "a", "text": "x", "tenant": "ab\ud800"}', max_text_bytes=100)
    with pytest.raises(InvalidMessage, match=rf"deeper than {MAX_JSON_DEPTH} levels"):
        decode_request(_deep(50_000), max_text_bytes=100)
    with pytest.raises(InvalidMessage, match=r"record is \d+ bytes, limit 1048576"):
        decode_request(b" " * (MAX_RECORD_BYTES + 1), max_text_bytes=100)


def test_depth_limit_is_exact_and_ignores_brackets_in_strings():
    ok = b'{"id": "a", "text": "x", "extra": ' + _deep(MAX_JSON_DEPTH - 1) + b"}"  # the object is one level
    assert decode_request(ok, max_text_bytes=100).id == "a"
    too_deep = b'{"id": "a", "text": "x", "extra": ' + _deep(MAX_JSON_DEPTH) + b"}"
    with pytest.raises(InvalidMessage, match="too_deep"):
        decode_request(too_deep, max_text_bytes=100)
    brackets = "[{" * 5000 + '\\"]'  # in a string, with an escaped quote: text, not nesting
    assert decode_request(json.dumps({"id": "a", "text": brackets}), max_text_bytes=20_000).text == brackets
    wide = b'{"id": "a", "text": "x", "extra": [' + b"[]," * 100_000 + b"[]]}"  # many brackets, shallow
    assert decode_request(wide, max_text_bytes=100).id == "a"
    with pytest.raises(InvalidMessage, match="malformed_json"):  # unbalanced but shallow: the parser's verdict
        decode_request(b'{"id": "a", "text": "x", "e": [' + b"}" * 40 + b"]}", max_text_bytes=100)


def test_a_valid_surrogate_pair_is_fine_and_the_record_limit_follows_max_text_bytes():
    request = decode_request(rb'{"id": "a", "text": "emoji \ud83d\ude00"}', max_text_bytes=100)
    assert request.text == "emoji \U0001F600" and request.to_bytes()
    big = json.dumps({"id": "a", "text": "\u00e9" * 200_000})  # 400 kB of text, 1.2 MB escaped: over 1 MiB
    assert decode_request(big, max_text_bytes=400_000).text == "\u00e9" * 200_000


@pytest.mark.parametrize("field", ["event_id", "request_id", "label", "tenant"])
def test_feedback_with_a_lone_surrogate_in_any_field_is_refused(field):
    event = {"event_id": "e", "request_id": "r", "kind": "label", "label": "x", field: "bad\ud800"}
    for raw in (json.dumps(event), json.dumps(event, ensure_ascii=False)):  # escaped, and the raw str
        with pytest.raises(InvalidMessage) as info:
            decode_feedback(raw)
        assert info.value.reason == "invalid_unicode" and field in info.value.detail


def test_feedback_poison():
    for raw, reason in [(_deep(50_000), "too_deep"), (b"1" * 5000, "malformed_json"),
                        (b'{"event_id": "e", "request_id": "r", "kind": "thumbs_up", "ts": NaN}', "wrong_type")]:
        with pytest.raises(InvalidMessage) as info:
            decode_feedback(raw)
        assert info.value.reason == reason


# --- dead letters: always serializable, optionally redacted -------------------------------------------------

def test_a_dead_letter_always_serializes_whatever_it_is_given():
    error = InvalidMessage("decode_error", "message echoing \ud800 a lone surrogate")
    for raw in (b"\xff\xfe\xed\xa0\x80", "raw \ud800 text", b"x" * 100_000):
        letter = DeadLetter.of(raw, error, "requests", 0, 1)
        decoded = json.loads(letter.to_bytes())
        assert decoded["reason"] == "decode_error" and "\ud800" not in decoded["detail"]
        assert decoded["payload_bytes"] == len(raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass"))
        assert len(decoded["payload"]) <= DEAD_LETTER_PAYLOAD_CHARS


def test_redacted_dead_letter_keeps_reason_and_offset_and_only_a_keyed_hash():
    raw = b'{"id": "a", "text": "my card number is 1234"}'
    error = InvalidMessage("empty_text", "text is empty or blank")
    letter = DeadLetter.of(raw, error, "requests", 3, 99, redact=True, key=b"k3y")
    assert letter.payload == "" and b"1234" not in letter.to_bytes()
    assert (letter.reason, letter.detail, letter.partition, letter.offset) == ("empty_text", error.detail, 3, 99)
    assert letter.payload_bytes == len(raw)
    assert letter.payload_digest == "hmac-sha256:" + hmac.new(b"k3y", raw, hashlib.sha256).hexdigest()
    assert payload_digest(raw, "k3y") == letter.payload_digest  # a str key is its UTF-8 bytes
    plain = DeadLetter.of(raw, error, "requests", 3, 99, redact=True)
    assert plain.payload_digest == "sha256:" + hashlib.sha256(raw).hexdigest()
    kept = DeadLetter.of(raw, error, "requests", 3, 99)  # the original signature: payload kept, no digest
    assert kept.payload == raw.decode() and kept.payload_digest is None and kept.payload_bytes == len(raw)
    assert DeadLetter.model_validate_json(letter.to_bytes()) == letter


def test_a_record_without_a_value_is_refused_and_dead_lettered():
    with pytest.raises(InvalidMessage, match="malformed_json: the record has no value"):
        decode_request(None, max_text_bytes=100)
    with pytest.raises(InvalidMessage, match="malformed_json"):
        decode_feedback(None)
    letter = DeadLetter.of(None, InvalidMessage("malformed_json", "no value"), "requests", 0, 7)
    assert (letter.payload, letter.payload_bytes, letter.offset) == ("", 0, 7) and letter.to_bytes()
