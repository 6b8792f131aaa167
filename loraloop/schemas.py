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

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

SCHEMA_VERSION = 1
MAX_ID_CHARS = 200
DEAD_LETTER_PAYLOAD_CHARS = 16_384

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
    id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    text: str
    tenant: str | None = None
    ts: float = Field(default_factory=time.time)


class TopLabel(BaseModel):
    model_config = ConfigDict(frozen=True)
    label: str
    score: float


class Prediction(_Record):
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
    payload: str
    reason: str
    detail: str = ""
    source_topic: str
    partition: int = -1
    offset: int = -1
    ts: float = Field(default_factory=time.time)

    @classmethod
    def of(cls, raw: bytes, error: InvalidMessage, topic: str, partition: int, offset: int) -> DeadLetter:
        text = raw.decode("utf-8", errors="replace")[:DEAD_LETTER_PAYLOAD_CHARS]
        return cls(payload=text, reason=error.reason, detail=error.detail, source_topic=topic,
                   partition=partition, offset=offset)


FeedbackKind = Literal["label", "thumbs_up", "thumbs_down"]


class FeedbackEvent(_Record):
    event_id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    request_id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    kind: FeedbackKind
    label: str | None = None
    tenant: str | None = None
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
    ts: float = Field(default_factory=time.time)

    @property
    def target(self) -> str | None:
        return self.label


def _load_object(raw: bytes | str) -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidMessage("malformed_json", str(e)) from e
    if not isinstance(obj, dict):
        raise InvalidMessage("not_an_object", f"expected a JSON object, got {type(obj).__name__}")
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
    """Parse and validate one request; raise :class:`InvalidMessage` with the reason."""
    obj = _load_object(raw)
    if isinstance(obj.get("text"), str) and len(obj["text"].encode("utf-8")) > max_text_bytes:
        raise InvalidMessage("oversize_text", f"text is {len(obj['text'].encode())} bytes, limit {max_text_bytes}")
    try:
        request = Request.model_validate(obj, strict=False)
    except ValidationError as e:
        raise _validation_reason(e, "id") from e
    if not isinstance(obj.get("id"), str) or not isinstance(obj.get("text"), str):
        raise InvalidMessage("wrong_type", "id and text must be strings")
    if not request.text.strip():
        raise InvalidMessage("empty_text", "text is empty or blank")
    return request


def decode_feedback(raw: bytes | str) -> FeedbackEvent:
    """Parse and validate one feedback event; raise :class:`InvalidMessage` with the reason."""
    obj = _load_object(raw)
    try:
        event = FeedbackEvent.model_validate(obj)
    except ValidationError as e:
        raise _validation_reason(e, "event_id") from e
    if event.kind == "label" and not event.label:
        raise InvalidMessage("missing_label", "a 'label' event needs a non-empty label")
    return event
