"""Send feedback on served predictions to the feedback topic.

Example:
    >>> from loraloop.transport.memory import MemoryTransport
    >>> with FeedbackClient(MemoryTransport(), topic="fb") as client:
    ...     event = client.label("r1", "billing")
    >>> (event.kind, event.label, len(event.event_id))
    ('label', 'billing', 32)
"""

from __future__ import annotations

import uuid

from loraloop.schemas import FeedbackEvent, FeedbackKind
from loraloop.settings import Settings
from loraloop.transport import Producer, Transport, make_transport

DEFAULT_TOPIC = Settings.model_fields["feedback_topic"].default


class FeedbackClient:
    """Produces :class:`FeedbackEvent` records keyed by request id (events on one request stay in order).

    Args:
        source: settings (the transport and ``feedback_topic`` come from them) or a transport.
        topic: the feedback topic (default: the settings' one, else ``loraloop.feedback``).
    """

    def __init__(self, source: Settings | Transport, topic: str | None = None) -> None:
        if isinstance(source, Settings):
            self.transport, self.topic = make_transport(source), topic or source.feedback_topic
        else:
            self.transport, self.topic = source, topic or DEFAULT_TOPIC
        self._producer: Producer | None = None

    def label(self, request_id: str, label: str, *, tenant: str | None = None,
              source: str | None = None) -> FeedbackEvent:
        """The correct label of a served request; ``source``: who says so (a user, client or annotator id)."""
        if not label:
            raise ValueError(f"a label event needs a non-empty label, got {label!r}")
        return self._send(request_id, "label", label, tenant, source)

    def thumbs_up(self, request_id: str, *, tenant: str | None = None, source: str | None = None) -> FeedbackEvent:
        """The served label was right."""
        return self._send(request_id, "thumbs_up", None, tenant, source)

    def thumbs_down(self, request_id: str, *, tenant: str | None = None, source: str | None = None) -> FeedbackEvent:
        """The served label was wrong."""
        return self._send(request_id, "thumbs_down", None, tenant, source)

    def send(self, event: FeedbackEvent) -> FeedbackEvent:
        """Produce a ready-made event (sending the same event again is deduplicated by the ingester)."""
        if self._producer is None:
            self._producer = self.transport.producer()
        self._producer.send(self.topic, event.to_bytes(), key=event.request_id.encode())
        return event

    def _send(self, request_id: str, kind: FeedbackKind, label: str | None, tenant: str | None,
              source: str | None) -> FeedbackEvent:
        return self.send(FeedbackEvent(event_id=uuid.uuid4().hex, request_id=request_id, kind=kind, label=label,
                                       tenant=tenant, source=source))

    def flush(self, timeout: float | None = 30.0) -> None:
        """Block until every event sent so far is acknowledged (raises TransportError)."""
        if self._producer is not None:
            self._producer.flush(timeout=timeout)

    def close(self) -> None:
        """Flush and close the producer."""
        if self._producer is not None:
            producer, self._producer = self._producer, None
            try:
                producer.flush(timeout=30.0)
            finally:
                producer.close()

    def __enter__(self) -> FeedbackClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
