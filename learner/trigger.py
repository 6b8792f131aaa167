"""When a learner cycle starts: on a timer, on a count of new feedback, or when ops ask.

:func:`due` is the pure decision. Ops requests (``loraloop retrain``) are small files
under ``<registry>/triggers/`` on the registry's own filesystem (any fsspec URL), so a
trigger reaches a learner running in another process, on another machine, through the
one store every learner already reads.

Example:
    >>> due(now=100.0, last_cycle_at=0.0, pending=10, ops_requested=False, interval_s=600, min_feedback=200)
    >>> due(now=100.0, last_cycle_at=0.0, pending=250, ops_requested=False, interval_s=600, min_feedback=200)
    'count'
    >>> due(now=700.0, last_cycle_at=0.0, pending=0, ops_requested=False, interval_s=600, min_feedback=200)
    'timer'
    >>> due(now=1.0, last_cycle_at=0.0, pending=0, ops_requested=True, interval_s=600, min_feedback=200)
    'ops'
"""

from __future__ import annotations

import json
import logging
import secrets
import time

import fsspec

logger = logging.getLogger(__name__)


def due(now: float, last_cycle_at: float, pending: int, ops_requested: bool, interval_s: float,
        min_feedback: int) -> str | None:
    """The trigger that starts a cycle now, or None."""
    if ops_requested:
        return "ops"
    if pending >= min_feedback:
        return "count"
    if now - last_cycle_at >= interval_s:
        return "timer"
    return None


class OpsTriggers:
    """Retrain requests stored as files under ``<registry url>/triggers``."""

    def __init__(self, registry_url: str) -> None:
        self.fs, root = fsspec.core.url_to_fs(registry_url)
        self.folder = f"{root.rstrip('/')}/triggers"

    def request(self, reason: str = "ops") -> str:
        """Ask the learner for a cycle; returns the request id."""
        self.fs.makedirs(self.folder, exist_ok=True)
        request_id = f"{time.time_ns():020d}-{secrets.token_hex(3)}"
        with self.fs.open(f"{self.folder}/{request_id}.json", "wb") as f:
            f.write(json.dumps({"id": request_id, "reason": reason, "at": time.time()}).encode())
        logger.info("retrain requested (%s): %s", reason, request_id)
        return request_id

    def take(self) -> list[dict]:
        """Every pending request, removed from the store (each starts at most one cycle)."""
        if not self.fs.exists(self.folder):
            return []
        taken = []
        for path in sorted(p for p in self.fs.ls(self.folder, detail=False) if p.endswith(".json")):
            try:
                with self.fs.open(path, "rb") as f:
                    taken.append(json.loads(f.read()))
                self.fs.rm(path)
            except (FileNotFoundError, ValueError) as e:  # another learner took it, or a torn write
                logger.warning("skipping retrain request %s: %s", path, e)
        return taken
