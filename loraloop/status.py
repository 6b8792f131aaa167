"""What an operator (or a dashboard, or a proxy reconciling after a restart) sees of the loop, as one dict.

:func:`collect_status` reads the registry (active pointer, versions, cycle records) and, when
given one, the feedback buffer; it writes nothing. ``loraloop status``, ``loraloop status
--serve`` and the gateway's ``GET /v1/status`` all show what it returns.

Example:
    >>> from loraloop.registry import make_registry
    >>> from loraloop.settings import Settings
    >>> status = collect_status(make_registry(Settings(registry_url="memory://doctest-status")))
    >>> status["active"], status["history"], status["last_cycles"], status["probation"]
    (None, [], [], None)
"""

from __future__ import annotations

import hashlib
import json
import logging

from loraloop.buffer.base import FeedbackBuffer
from loraloop.model import LABELS_FILE
from loraloop.redact import mask_url
from loraloop.registry import AdapterRegistry, RegistryError, check_version_name
from loraloop.registry.checks import read_regular_file
from loraloop.registry.probation import probation_status
from loraloop.settings import Settings

logger = logging.getLogger(__name__)

LAST_CYCLES = 10
CURVE_POINTS = 200
# Fields of a cycle record shown as they are (the whole record stays in the registry's cycles/ folder).
_CYCLE_FIELDS = ("started_at", "duration_s", "trigger", "outcome", "version", "parent", "reason", "examples",
                 "train_rows", "recipe", "screened_examples", "quarantined", "new_labels")


def collect_status(registry: AdapterRegistry, buffer: FeedbackBuffer | None = None, *,
                   last_cycles: int = LAST_CYCLES, redis_url: str = "") -> dict:
    """The loop's state: active version, its history, the last cycles, the learning curve, buffer depth.

    Args:
        registry: the adapter registry (read only).
        buffer: the feedback buffer whose depth to show (None: not shown, ``buffer`` is None).
        last_cycles: how many of the newest cycle records to list.
        redis_url: shown masked, for the operator to see which Redis holds the pointer copy.

    Returns:
        A JSON-serializable dict: ``registry``, ``redis``, ``active``, ``generation``, ``reason``,
        ``updated_at``, ``history`` (oldest first), ``versions`` (count), ``probation`` (see
        :func:`loraloop.registry.probation.probation_status`; None when nothing was on probation), ``last_cycles`` (newest last: trigger, duration,
        outcome and the gate's reason), ``learning_curve`` (per evaluated cycle, the candidate's
        and the live version's holdout and reference accuracy) and ``buffer`` (``depth``: examples
        not yet acknowledged by the learner, or ``error`` when the buffer does not answer).
    """
    pointer = registry.active()
    cycles = registry.cycles()
    return {
        "registry": mask_url(registry.url),
        "redis": mask_url(redis_url) or None,
        "active": pointer.version,
        "generation": pointer.generation,
        "reason": pointer.reason,
        "updated_at": pointer.updated_at or None,
        "history": list(pointer.history),
        "versions": len(registry.versions()),
        "probation": probation_status(registry),
        "last_cycles": [_cycle(c) for c in cycles[-last_cycles:]] if last_cycles > 0 else [],
        "learning_curve": _curve(cycles),
        "buffer": _buffer(buffer),
    }


def list_adapters(registry: AdapterRegistry) -> list[dict]:
    """Every version, oldest first: id, parent, creation time, status, active marker, evaluation."""
    active = registry.active().version
    return [{"version": info.version, "parent": info.parent, "created_at": info.created_at,
             "status": info.status.get("status", "ok"), "active": info.version == active,
             "labels": info.metadata.get("labels"), "trigger": info.metadata.get("trigger"),
             "evaluation": info.metadata.get("evaluation")} for info in registry.versions()]


def describe_adapter(registry: AdapterRegistry, version: str) -> dict:
    """One version: metadata (evaluation, gate reason, recipe), status, label map and file checksums.

    The label map is read as the worker reads files (a regular file within bounds, never through a
    link) and checked against its sha256 in the metadata.

    Raises:
        RegistryError: ``version`` is not a well-formed id (``../x`` included) or is unknown.
    """
    info = registry.show(check_version_name(version))
    path = f"{registry.root}/versions/{version}/{LABELS_FILE}"
    protocol = registry.fs.protocol if isinstance(registry.fs.protocol, str) else registry.fs.protocol[0]
    local = protocol in {"file", "local"}
    data = read_regular_file(path, f"version {version}") if local else registry.fs.cat_file(path)
    expected = (info.metadata.get("files") or {}).get(LABELS_FILE)
    if hashlib.sha256(data).hexdigest() != expected:
        raise RegistryError(f"version {version}: {LABELS_FILE} does not match its checksum in the metadata")
    labels = json.loads(data).get("labels", [])
    meta = info.metadata
    return {"version": version, "parent": info.parent, "created_at": info.created_at,
            "active": registry.active().version == version, "status": info.status or {"status": "ok"},
            "labels": labels, "evaluation": meta.get("evaluation"), "gate": meta.get("gate"),
            "trigger": meta.get("trigger"), "recipe": meta.get("recipe"), "train_loss": meta.get("train_loss"),
            "examples": meta.get("examples"), "files": meta.get("files"),
            "signed": registry.verify_key is not None}


def status_buffer(settings: Settings) -> FeedbackBuffer | None:
    """The shared feedback buffer whose depth a status shows: Redis with short timeouts and no retries (a
    status must answer quickly while Redis is down), or None without ``redis_url`` (an in-process buffer
    of another process cannot be seen)."""
    if not settings.redis_url:
        return None
    import redis

    from loraloop.buffer.redis import RedisFeedbackBuffer

    client = redis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=1, retry=None)
    return RedisFeedbackBuffer(client, settings.redis_prefix, max_items=settings.buffer_max, trim=settings.buffer_trim,
                               replay_per_label=settings.replay_per_label, claim_idle_s=settings.claim_idle_s,
                               dedup_ttl_s=settings.dedup_ttl_s, retention_s=settings.request_text_retention_s)


def _cycle(record: dict) -> dict:
    out = {k: record.get(k) for k in _CYCLE_FIELDS}
    out["screened"] = record.get("screened") or {}
    return out


def _curve(cycles: list[dict]) -> list[dict]:
    """One point per cycle that evaluated a candidate: the newest ``CURVE_POINTS``."""
    points = []
    for record in cycles:
        candidate, active = record.get("candidate") or {}, record.get("active") or {}
        if not candidate:
            continue
        points.append({"at": record.get("started_at"), "outcome": record.get("outcome"),
                       "version": record.get("version"), "holdout": candidate.get("holdout"),
                       "reference": candidate.get("reference"), "live_holdout": active.get("holdout"),
                       "live_reference": active.get("reference")})
    return points[-CURVE_POINTS:]


def _buffer(buffer: FeedbackBuffer | None) -> dict | None:
    if buffer is None:
        return None
    try:
        return {"depth": buffer.depth()}
    except Exception as e:  # a status page must answer while Redis is down: say so instead
        logger.debug("feedback buffer unavailable for status: %s", e)
        return {"error": f"{type(e).__name__}: {e}"}
