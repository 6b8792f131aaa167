"""Feedback boundary: the request log and the feedback buffer, in Redis or in memory."""

from __future__ import annotations

import math
import threading

from loraloop.buffer.base import BufferError, Claim, Durability, FeedbackBuffer, RequestLog
from loraloop.settings import Settings

__all__ = ["BufferError", "Claim", "Durability", "FeedbackBuffer", "RequestLog", "make_feedback_buffer", "make_request_log"]

_shared: dict[str, object] = {}
_lock = threading.Lock()


def request_log_ttl(settings: Settings) -> int:
    """The request log's TTL: ``request_log_ttl_s``, capped by the text retention."""
    return max(1, min(settings.request_log_ttl_s, math.ceil(settings.request_text_retention_s)))


def make_request_log(settings: Settings) -> RequestLog:
    """Redis when ``redis_url`` is set, else the process-wide in-memory log."""
    if settings.redis_url:
        from loraloop.buffer.redis import RedisRequestLog, connect

        return RedisRequestLog(connect(settings.redis_url), settings.redis_prefix, request_log_ttl(settings))
    from loraloop.buffer.memory import MemoryRequestLog

    with _lock:
        return _shared.setdefault("request_log", MemoryRequestLog(request_log_ttl(settings)))


def make_feedback_buffer(settings: Settings) -> FeedbackBuffer:
    """Redis when ``redis_url`` is set, else the process-wide in-memory buffer."""
    args = dict(max_items=settings.buffer_max, trim=settings.buffer_trim, replay_per_label=settings.replay_per_label,
                claim_idle_s=settings.claim_idle_s, seed=settings.seed, retention_s=settings.request_text_retention_s)
    if settings.redis_url:
        from loraloop.buffer.redis import RedisFeedbackBuffer, connect

        return RedisFeedbackBuffer(connect(settings.redis_url), settings.redis_prefix,
                                   dedup_ttl_s=settings.dedup_ttl_s, **args)
    from loraloop.buffer.memory import MemoryFeedbackBuffer

    with _lock:
        return _shared.setdefault("buffer", MemoryFeedbackBuffer(dedup_ttl_s=settings.dedup_ttl_s, **args))
