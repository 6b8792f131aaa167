"""Pure decisions of the feedback ingester: join an event to its served request, judge it.

No I/O here: the ingester fetches the served request and the clock, these functions decide.

Example:
    >>> from loraloop.schemas import FeedbackEvent, ServedRequest
    >>> served = ServedRequest(request_id="r1", text="hi", label="greet", score=0.9, adapter_version="v1", ts=0.0)
    >>> up = FeedbackEvent(event_id="e1", request_id="r1", kind="thumbs_up", ts=1.0)
    >>> join(up, served, None, now=2.0, grace_s=10.0).label
    'greet'
    >>> join(up, None, None, now=2.0, grace_s=10.0)
    Retry(request_id='r1', until=11.0)
    >>> join(up, None, None, now=20.0, grace_s=10.0).reason
    'unknown_request'
    >>> join(up, None, None, now=20.0, grace_s=10.0, store_retry_s=60.0, store_outage="was down")
    Retry(request_id='r1', until=61.0)
    >>> join(up, None, None, now=70.0, grace_s=10.0, store_retry_s=60.0, store_outage="was down").reason
    'request_log_unavailable'
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

from loraloop.schemas import Example, FeedbackEvent, ServedRequest

MAX_LABEL_CHARS = 64


@dataclass(frozen=True)
class Rejection:
    """The event goes to the dead-letter topic; ``reason`` is one of ``schemas.REASONS``."""

    reason: str
    detail: str


@dataclass(frozen=True)
class Retry:
    """The served request is not in the log yet: try again until ``until`` (unix time)."""

    request_id: str
    until: float


def parse_allowed(text: str) -> frozenset[str] | None:
    """``settings.allowed_labels`` as a set; None (any well-formed label) when empty.

    Example:
        >>> sorted(parse_allowed(" a, b,,c "))
        ['a', 'b', 'c']
        >>> parse_allowed("") is None
        True
    """
    labels = frozenset(p.strip() for p in text.split(",") if p.strip())
    return labels or None


def label_problem(label: str, allowed: frozenset[str] | None) -> str | None:
    """Why ``label`` may not be named by feedback, or None when it may.

    Example:
        >>> label_problem("x" * 65, None)
        'label is 65 characters, limit 64'
        >>> label_problem("b", frozenset({"a"}))
        "label 'b' is not one of ['a']"
    """
    if allowed is not None:
        return None if label in allowed else f"label {label!r} is not one of {sorted(allowed)}"
    if not 1 <= len(label) <= MAX_LABEL_CHARS:
        return f"label is {len(label)} characters, limit {MAX_LABEL_CHARS}"
    if any(unicodedata.category(c).startswith("C") for c in label):
        return f"label {label!r} contains control characters"
    return None


def join(event: FeedbackEvent, served: ServedRequest | None, allowed: frozenset[str] | None, now: float,
         grace_s: float, first_seen: float | None = None, store_retry_s: float = 0.0,
         store_outage: str | None = None) -> Example | Rejection | Retry:
    """Decide what one feedback event becomes.

    Args:
        event: the decoded feedback event.
        served: the request it judges, from the request log (None: unknown, expired, or not logged yet).
        allowed: labels a ``label`` event may name (None: any label of 1-64 characters without control
            characters).
        now: the current unix time.
        grace_s: how long an event whose request is unknown is retried (early feedback).
        first_seen: unix time the ingester first saw the event; the grace runs from the earlier of it
            and ``event.ts``, so a producer clock running ahead cannot stretch the wait.
        store_retry_s: how long (from first sight) an event whose request is missing is retried when
            the request log may have lost the entry (``store_outage`` is set).
        store_outage: what the request log went through that may have lost the entry (it was down,
            or restarted), or None. Such an event is retried for ``store_retry_s`` and then refused
            as ``request_log_unavailable`` (replayable once the request is logged), not as
            ``unknown_request``.

    Returns:
        The :class:`Example` to buffer, a :class:`Rejection` to dead-letter, or :class:`Retry`.
    """
    if event.kind == "label":
        problem = label_problem(event.label or "", allowed)
        if problem is not None:
            return Rejection("label_not_allowed", problem)
    if served is None:
        start = event.ts if first_seen is None else min(event.ts, first_seen)
        if now - start < grace_s:
            return Retry(event.request_id, start + grace_s)
        if store_outage is not None:
            seen = start if first_seen is None else first_seen
            if now - seen < store_retry_s:
                return Retry(event.request_id, seen + store_retry_s)
            return Rejection("request_log_unavailable", f"request {event.request_id!r} is not in the request log "
                             f"{now - seen:.1f} s after the feedback was first seen, and the request log "
                             f"{store_outage}: the entry may have been lost; replay this dead letter once the "
                             "request is logged")
        return Rejection("unknown_request", f"request {event.request_id!r} is not in the request log "
                         f"(unknown or expired) {now - start:.1f} s after the feedback")
    label, negative = {"label": (event.label, None), "thumbs_up": (served.label, None),
                       "thumbs_down": (None, served.label)}[event.kind]
    return Example(event_id=event.event_id, request_id=event.request_id, text=served.text, kind=event.kind,
                   label=label, negative_label=negative, served_label=served.label,
                   adapter_version=served.adapter_version, source=event.source, ts=event.ts)


def paired_judgement(example: Example, served: ServedRequest) -> tuple[bool, bool] | None:
    """(serving version correct, replaced version correct) on a shadow-scored request, or None.

    Only where the truth of both answers is known: a ``label`` event names it, a
    ``thumbs_up`` confirms the served label; a ``thumbs_down`` only says the served label
    was wrong, which decides the shadow answer only when it was the same label.
    """
    shadow = served.shadow_label
    if served.shadow_version is None or shadow is None:
        return None
    if example.kind == "label":
        return example.label == served.label, example.label == shadow
    if example.kind == "thumbs_up":
        return True, shadow == served.label
    return (False, False) if shadow == served.label else None


def judgement(example: Example) -> tuple[bool, bool]:
    """(judged, correct) of the served prediction an example is about.

    Every kind judges the prediction: a ``label`` event is correct iff it names the served
    label, ``thumbs_up`` is correct, ``thumbs_down`` is not.
    """
    if example.kind == "label":
        return True, example.label == example.served_label
    return True, example.kind == "thumbs_up"
