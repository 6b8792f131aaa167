"""Message contracts: every record that crosses a topic, the request log or the buffer.

All records are JSON objects carrying a schema version ``v``. Decoding is the only
way in: ``decode_request`` and ``decode_feedback`` turn raw bytes into a validated
record or raise :class:`InvalidMessage` with a machine-readable ``reason`` (used as
the dead-letter reason and as a bounded metric label).

Example:
    >>> decode_request(b'{"id": "r1", "text": "hi", "ts": 1.0}', max_text_bytes=100).id
    'r1'
    >>> try:
    ...     decode_request(b'{"id": "r1", "text": "", "ts": 1.0}', max_text_bytes=100)
    ... except InvalidMessage as e:
    ...     print(e.reason)
    empty_text
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

SCHEMA_VERSION = 1
MAX_ID_CHARS = 200
DEAD_LETTER_PAYLOAD_CHARS = 16_384
DEAD_LETTER_DETAIL_CHARS = 1_000
# Bounds checked on the raw bytes *before* json.loads. Our records nest three levels at most
# (a prediction's top_k); the C JSON parser recurses once per level and raises RecursionError
# near 1,000 levels, so 50k "[" would otherwise escape as something other than InvalidMessage.
MAX_JSON_DEPTH = 32
# Largest raw record: a request may carry max_text_bytes of text, which JSON escaping
# ("\uXXXX" for each UTF-16 unit) can grow sixfold; plus room for the other fields.
MAX_RECORD_BYTES = 1 << 20
_ESCAPE_FACTOR = 6
_ENVELOPE_BYTES = 64 * 1024

# Every reason a record can be refused for; bounded, so safe as a metric label.
REASONS = (
    "malformed_json",
    "not_an_object",
    "unsupported_version",
    "missing_id",
    "wrong_type",
    "empty_text",
    "oversize_text",
    "invalid_kind",
    "missing_label",
    "unknown_request",
    "label_not_allowed",
    "duplicate",
    "buffer_full",
    "inference_error",
    "oversize_record",
    "too_deep",
    "invalid_unicode",
    "unserializable",
    "decode_error",
    "request_log_unavailable",
    "ingest_error",
)


class InvalidMessage(ValueError):
    """A record that must not reach the model; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    v: int = SCHEMA_VERSION

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


class Request(_Record):
    # NaN/inf are not JSON: they would serialize as null and make the prediction unreadable downstream.
    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)
    id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    text: str
    # Bounded: it is copied into the prediction, which must stay far below the broker's record limit.
    tenant: str | None = Field(None, max_length=MAX_ID_CHARS)
    ts: float = Field(default_factory=time.time)


class TopLabel(BaseModel):
    model_config = ConfigDict(frozen=True)
    label: str
    score: float


class Prediction(_Record):
    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)
    request_id: str
    label: str
    score: float
    top_k: list[TopLabel]
    adapter_version: str
    latency_ms: float
    truncated: bool = False
    tenant: str | None = None
    ts: float = Field(default_factory=time.time)


class DeadLetter(_Record):
    """A refused record, with why and where it came from.

    ``payload`` is the record as text (first 16 KiB, invalid UTF-8 replaced), or empty when
    redacted; ``payload_bytes`` is the raw record's length either way, and a redacted letter
    carries ``payload_digest`` (``hmac-sha256:<hex>`` with a key, else ``sha256:<hex>``) so a
    known payload can still be matched to its letter without the letter holding user text.
    """

    payload: str
    reason: str
    detail: str = ""
    source_topic: str
    partition: int = -1
    offset: int = -1
    payload_bytes: int | None = None
    payload_digest: str | None = None
    ts: float = Field(default_factory=time.time)

    @classmethod
    def of(cls, raw: bytes | str, error: InvalidMessage, topic: str, partition: int, offset: int,
           redact: bool = False, key: bytes | str = b"") -> DeadLetter:
        """The dead letter of ``raw``, refused for ``error``; never raises on any ``raw``.

        Args:
            raw: the record as received.
            error: why it was refused (its reason and detail are kept, also when redacted).
            topic, partition, offset: where it was read (-1: not from a topic).
            redact: drop the payload and keep only its digest and length.
            key: HMAC key of the digest; empty: a plain sha256, which a guess of a short text can
                confirm, so set a key (``redaction_key``) where the texts are sensitive.

        Example:
            >>> letter = DeadLetter.of(b"secret text", InvalidMessage("malformed_json", "x"), "t", 0, 5,
            ...                        redact=True, key=b"k")
            >>> letter.payload, letter.payload_bytes, letter.payload_digest[:12]
            ('', 11, 'hmac-sha256:')
        """
        data = _raw_bytes(raw)
        detail = _printable(error.detail)[:DEAD_LETTER_DETAIL_CHARS]
        if redact:
            return cls(payload="", payload_bytes=len(data), payload_digest=payload_digest(data, key),
                       reason=error.reason, detail=detail, source_topic=_printable(topic), partition=partition,
                       offset=offset)
        text = data[:DEAD_LETTER_PAYLOAD_CHARS * 4].decode("utf-8", errors="replace")[:DEAD_LETTER_PAYLOAD_CHARS]
        return cls(payload=text, payload_bytes=len(data), reason=error.reason, detail=detail,
                   source_topic=_printable(topic), partition=partition, offset=offset)


def payload_digest(data: bytes, key: bytes | str = b"") -> str:
    """``hmac-sha256:<hex>`` of ``data`` under ``key``, or ``sha256:<hex>`` when ``key`` is empty.

    Example:
        >>> payload_digest(b"abc")[:15]
        'sha256:ba7816bf'
    """
    key = key.encode() if isinstance(key, str) else key
    if key:
        return "hmac-sha256:" + hmac.new(key, data, hashlib.sha256).hexdigest()
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _raw_bytes(raw: object) -> bytes:
    """The bytes of a record value as received: str as UTF-8 (surrogates kept), None (a tombstone) as b""."""
    if raw is None:
        return b""
    if isinstance(raw, str):
        return raw.encode("utf-8", errors="surrogatepass")
    try:
        return bytes(raw)
    except (TypeError, ValueError):
        return _printable(repr(raw)).encode()


def _printable(text: str) -> str:
    """``text`` with lone surrogates replaced, so that it always serializes to UTF-8 JSON."""
    return str(text).encode("utf-8", errors="replace").decode("utf-8")


FeedbackKind = Literal["label", "thumbs_up", "thumbs_down"]


class FeedbackEvent(_Record):
    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)
    event_id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    request_id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    kind: FeedbackKind
    label: str | None = Field(None, max_length=MAX_ID_CHARS)
    tenant: str | None = Field(None, max_length=MAX_ID_CHARS)
    # Who said it (a user, client or annotator id): optional; the learner caps how much of a cycle one
    # source may contribute (``source_max_share``), which bounds any single source's influence.
    source: str | None = Field(None, max_length=MAX_ID_CHARS)
    ts: float = Field(default_factory=time.time)


class ServedRequest(_Record):
    """What the worker remembers of a served request, for feedback to join against."""

    request_id: str
    text: str
    label: str
    score: float
    adapter_version: str
    tenant: str | None = None
    ts: float = Field(default_factory=time.time)
    # Shadow scoring after a swap: the label the replaced adapter gave the same request.
    shadow_version: str | None = None
    shadow_label: str | None = None


class Example(_Record):
    """A feedback event joined to the request it judges: one unit of training data.

    ``label`` is the correct label when known (a ``label`` event, or a ``thumbs_up``
    confirming the served label). A ``thumbs_down`` carries no correct label: its
    ``negative_label`` is the served label that users said was wrong.
    """

    event_id: str
    request_id: str
    text: str
    kind: FeedbackKind
    label: str | None = None
    negative_label: str | None = None
    served_label: str
    adapter_version: str
    source: str | None = None  # the feedback event's source, when it named one
    ts: float = Field(default_factory=time.time)

    @property
    def target(self) -> str | None:
        return self.label


_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # a JSON string literal, escapes included
_NOT_BRACKET = re.compile(rb"[^\[\]{}]+")
_EMPTY_PAIR = re.compile(rb"\[\]|\{\}")


def _record_limit(max_text_bytes: int | None) -> int:
    if max_text_bytes is None:
        return MAX_RECORD_BYTES
    return max(MAX_RECORD_BYTES, _ESCAPE_FACTOR * max_text_bytes + _ENVELOPE_BYTES)


def _nesting_exceeds(data: bytes, limit: int) -> bool:
    """Whether the JSON text ``data`` nests arrays/objects deeper than ``limit``, without parsing it.

    Brackets inside string literals do not count. Each round deletes every innermost ``[]``
    or ``{}`` pair (a C-speed regex pass), so a text nested ``d`` deep empties in ``d`` rounds:
    at most ``limit`` passes over the text, whatever its shape. Unbalanced brackets that are
    not deep are left for ``json.loads`` to report as malformed.
    """
    if data.count(b"[") + data.count(b"{") <= limit:  # the common case: no scan at all
        return False
    brackets = _NOT_BRACKET.sub(b"", _STRING.sub(b"", data))
    for _ in range(limit):
        inner = _EMPTY_PAIR.sub(b"", brackets)
        if not inner:
            return False
        if inner == brackets:  # unbalanced: deep only if a long run of openers is left unclosed
            return re.search(rb"[\[{]{%d}" % (limit + 1), brackets) is not None
        brackets = inner
    return True


def _lone_surrogate(obj: object) -> str | None:
    """Where ``obj`` (parsed JSON) holds a string that is not valid Unicode, or None.

    ``json.loads`` turns an escaped lone surrogate (``"\\ud800"``) into a Python string that
    cannot be encoded as UTF-8: every later ``.encode()`` or serialization of it would raise.
    Iterative, so that no nesting can exhaust the stack.
    """
    stack: list[tuple[str, object]] = [("", obj)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                return f"{path or 'value'} holds a lone surrogate U+{ord(value[e.start]):04X} at index {e.start}"
        elif isinstance(value, dict):
            for k, v in value.items():
                name = f"{path}.{_printable(k)}" if path else _printable(k)
                stack.append((f"{name} (key)", k))
                stack.append((name, v))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(value))
    return None


def _load_object(raw: bytes | str, max_bytes: int = MAX_RECORD_BYTES) -> dict[str, Any]:
    """Parse one record: bounded in size and depth first, then parsed, then checked for valid Unicode."""
    if raw is None:  # a Kafka tombstone: a record with a key and no value
        raise InvalidMessage("malformed_json", "the record has no value (null)")
    data = _raw_bytes(raw)
    if len(data) > max_bytes:
        raise InvalidMessage("oversize_record", f"record is {len(data)} bytes, limit {max_bytes}")
    if _nesting_exceeds(data, MAX_JSON_DEPTH):
        raise InvalidMessage("too_deep", f"JSON nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        obj = json.loads(raw)
    except RecursionError as e:  # a nesting the scan could not see (e.g. UTF-16 text): same verdict
        raise InvalidMessage("too_deep", f"JSON nests deeper than the parser's recursion limit: {e}") from e
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer over 4300 digits
        raise InvalidMessage("malformed_json", str(e)[:DEAD_LETTER_DETAIL_CHARS]) from e
    if not isinstance(obj, dict):
        raise InvalidMessage("not_an_object", f"expected a JSON object, got {type(obj).__name__}")
    where = _lone_surrogate(obj)
    if where is not None:
        raise InvalidMessage("invalid_unicode", where)
    if obj.get("v", SCHEMA_VERSION) != SCHEMA_VERSION:
        raise InvalidMessage("unsupported_version", f"schema version {obj.get('v')!r}, expected {SCHEMA_VERSION}")
    return obj


def _validation_reason(error: ValidationError, id_field: str) -> InvalidMessage:
    first = error.errors()[0]
    field = ".".join(str(p) for p in first["loc"])
    if field == id_field and first["type"] in {"missing", "string_too_short"}:
        return InvalidMessage("missing_id", f"{field}: {first['msg']}")
    if field == "kind":
        return InvalidMessage("invalid_kind", f"kind: {first['msg']}")
    return InvalidMessage("wrong_type", f"{field}: {first['msg']}")


def decode_request(raw: bytes | str, max_text_bytes: int) -> Request:
    """Parse and validate one request.

    Never raises anything but :class:`InvalidMessage`, and what it returns always serializes
    (``to_bytes``), as do the prediction and the request-log entry made from it.

    Args:
        raw: the record as received (UTF-8 JSON object).
        max_text_bytes: most UTF-8 bytes of ``text``; the whole record may be about six
            times that (JSON escapes) plus 64 KiB, and at least 1 MiB.

    Raises:
        InvalidMessage: with the reason (one of :data:`REASONS`) and a detail naming the value.
    """
    try:
        obj = _load_object(raw, _record_limit(max_text_bytes))
        text = obj.get("text")
        if isinstance(text, str) and len(text.encode("utf-8")) > max_text_bytes:
            raise InvalidMessage("oversize_text", f"text is {len(text.encode())} bytes, limit {max_text_bytes}")
        try:
            request = Request.model_validate(obj, strict=False)
        except ValidationError as e:
            raise _validation_reason(e, "id") from e
        if not isinstance(obj.get("id"), str) or not isinstance(text, str):
            raise InvalidMessage("wrong_type", "id and text must be strings")
        if not request.text.strip():
            raise InvalidMessage("empty_text", "text is empty or blank")
        return request
    except InvalidMessage:
        raise
    except Exception as e:  # a path the checks above missed: still a dead letter, never a crash
        raise _unexpected(e) from e


def decode_feedback(raw: bytes | str) -> FeedbackEvent:
    """Parse and validate one feedback event.

    Never raises anything but :class:`InvalidMessage`, and what it returns always serializes.

    Raises:
        InvalidMessage: with the reason (one of :data:`REASONS`) and a detail naming the value.
    """
    try:
        obj = _load_object(raw)
        try:
            event = FeedbackEvent.model_validate(obj)
        except ValidationError as e:
            raise _validation_reason(e, "event_id") from e
        if event.kind == "label" and not event.label:
            raise InvalidMessage("missing_label", "a 'label' event needs a non-empty label")
        return event
    except InvalidMessage:
        raise
    except Exception as e:  # a path the checks above missed: still a dead letter, never a crash
        raise _unexpected(e) from e


def _unexpected(error: Exception) -> InvalidMessage:
    return InvalidMessage("decode_error", _printable(f"{type(error).__name__}: {error}")[:DEAD_LETTER_DETAIL_CHARS])
