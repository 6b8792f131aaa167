"""When a learner cycle starts: on a timer, on a count of new feedback, or when ops ask.

:func:`due` is the pure decision. Ops requests (``loraloop retrain``) are small files
under ``<registry>/triggers/`` on the registry's own filesystem (any fsspec URL), so a
trigger reaches a learner running in another process, on another machine, through the
one store every learner already reads.

Whoever can write to the registry could otherwise start retrains at will, so with
``api_token`` set a request carries an HMAC-SHA256 of its body keyed with the token
(:func:`sign`), and the learner deletes, logs and counts every file without a valid one,
older than ``TRIGGER_MAX_AGE_S``, or seen before. Without a token the learner takes every
request, as before, and says so once in its log.

Example:
    >>> due(now=100.0, last_cycle_at=0.0, pending=10, ops_requested=False, interval_s=600, min_feedback=200)
    >>> due(now=100.0, last_cycle_at=0.0, pending=250, ops_requested=False, interval_s=600, min_feedback=200)
    'count'
    >>> due(now=700.0, last_cycle_at=0.0, pending=0, ops_requested=False, interval_s=600, min_feedback=200)
    'timer'
    >>> due(now=1.0, last_cycle_at=0.0, pending=0, ops_requested=True, interval_s=600, min_feedback=200)
    'ops'
    >>> sign(b"token", {"id": "1", "reason": "ops", "at": 0.5})[:16]
    'e0f791927daf9830'
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import stat
import time
from collections import OrderedDict

import fsspec
from fsspec.implementations.local import LocalFileSystem

from loraloop.metrics import Metrics

logger = logging.getLogger(__name__)

TRIGGER_MAX_BYTES = 4096  # a request is a few fields; anything larger is not one
TRIGGER_MAX_AGE_S = 3600.0  # an older signed request is refused: a copy of an old file cannot replay it later
TRIGGER_MAX_SKEW_S = 300.0  # clocks of the requesting machine may run ahead this much
MAX_REASON_CHARS = 200
_SEEN_LIMIT = 10_000


def due(now: float, last_cycle_at: float, pending: int, ops_requested: bool, interval_s: float,
        min_feedback: int, quiet_since: float | None = None, drain_s: float = 0.0) -> str | None:
    """The trigger that starts a cycle now, or None.

    ``quiet_since``: when the buffer's pending count last changed. Once it has not changed for
    ``drain_s`` (traffic paused) and something is pending, a ``drain`` cycle learns the tail that
    would otherwise wait for the timer.

    Example:
        >>> due(100.0, 0.0, 5, False, 600.0, 200, quiet_since=60.0, drain_s=30.0)
        'drain'
        >>> due(100.0, 0.0, 5, False, 600.0, 200, quiet_since=80.0, drain_s=30.0) is None
        True
        >>> due(100.0, 0.0, 0, False, 600.0, 200, quiet_since=0.0, drain_s=30.0) is None
        True
    """
    if ops_requested:
        return "ops"
    if pending >= min_feedback:
        return "count"
    if now - last_cycle_at >= interval_s:
        return "timer"
    if drain_s > 0 and pending > 0 and quiet_since is not None and now - max(quiet_since, last_cycle_at) >= drain_s:
        return "drain"
    return None


def sign(token: bytes, body: dict) -> str:
    """HMAC-SHA256 (hex) of a request body, keyed with the API token; the ``hmac`` field itself is left out."""
    canonical = json.dumps({k: v for k, v in body.items() if k != "hmac"}, sort_keys=True, separators=(",", ":"),
                           ensure_ascii=True, allow_nan=False)
    return hmac.new(token, canonical.encode(), hashlib.sha256).hexdigest()


class TriggerRefused(ValueError):
    """A trigger file that is not a valid request; ``outcome`` is its metric label."""

    def __init__(self, outcome: str, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome


class OpsTriggers:
    """Retrain requests stored as files under ``<registry url>/triggers``.

    Args:
        registry_url: the registry's folder or fsspec URL.
        token: the API token; set, requests are signed (:meth:`request`) and only signed ones
            are taken (:meth:`take`).
        metrics: counts trigger files by outcome (``loraloop_learner_triggers_total``).
    """

    def __init__(self, registry_url: str, token: str = "", metrics: Metrics | None = None) -> None:
        self.fs, root = fsspec.core.url_to_fs(registry_url)
        self.folder = f"{root.rstrip('/')}/triggers"
        self.token = token.encode()
        self.metrics = metrics
        self._warned = False
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._stuck: set[str] = set()  # refused but not deletable (a directory, no permission): logged once

    def request(self, reason: str = "ops") -> str:
        """Ask the learner for a cycle (signed when a token is set); returns the request id."""
        self.fs.makedirs(self.folder, exist_ok=True)
        request_id = f"{time.time_ns():020d}-{secrets.token_hex(3)}"
        body: dict = {"id": request_id, "reason": reason[:MAX_REASON_CHARS], "at": time.time()}
        if self.token:
            body["hmac"] = sign(self.token, body)
        with self.fs.open(f"{self.folder}/{request_id}.json", "wb") as f:
            f.write(json.dumps(body).encode())
        logger.info("retrain requested (%s): %s%s", reason, request_id, "" if self.token else " (unsigned)")
        return request_id

    def take(self) -> list[dict]:
        """Every valid pending request, removed from the store (each starts at most one cycle).

        Files that are not valid requests are deleted too, each logged and counted with its reason;
        no file stops the learner.
        """
        if not self.fs.exists(self.folder):
            return []
        if not self.token and not self._warned:
            self._warned = True
            logger.warning("api_token is not set: retrain requests under %s are taken without a credential "
                           "(anyone who can write to the registry can start a cycle)", self.folder)
        taken = []
        for path in sorted(p for p in self.fs.ls(self.folder, detail=False) if str(p).endswith(".json")):
            if path in self._stuck:
                continue
            try:
                body = self._check(self._read(path), path)
            except FileNotFoundError:  # another learner took it
                continue
            except TriggerRefused as e:
                logger.warning("refusing retrain request %s (%s): %s", path, e.outcome, e)
                self._count(e.outcome)
                self._remove(path)
                continue
            except OSError as e:  # unreadable now (a store error): left for the next tick
                logger.warning("cannot read retrain request %s: %s", path, e)
                continue
            self._remove(path)
            self._count("accepted")
            taken.append(body)
        return taken

    def _read(self, path: str) -> bytes:
        if isinstance(self.fs, LocalFileSystem):
            return _read_local(path)
        size = self.fs.size(path)
        if size is not None and size > TRIGGER_MAX_BYTES:
            raise TriggerRefused("malformed", f"{size} bytes, over the {TRIGGER_MAX_BYTES}-byte limit")
        return self.fs.cat_file(path)

    def _check(self, raw: bytes, path: str) -> dict:
        if len(raw) > TRIGGER_MAX_BYTES:
            raise TriggerRefused("malformed", f"{len(raw)} bytes, over the {TRIGGER_MAX_BYTES}-byte limit")
        try:
            body = json.loads(raw)  # bounded above: no nesting deep enough to matter fits in 4 KiB
        except (ValueError, RecursionError) as e:
            raise TriggerRefused("malformed", f"not JSON ({e}): {raw[:80]!r}") from None
        if not isinstance(body, dict):
            raise TriggerRefused("malformed", f"a JSON {type(body).__name__}, expected an object: {raw[:80]!r}")
        request_id, at, reason = body.get("id"), body.get("at"), body.get("reason", "")
        if not isinstance(request_id, str) or not isinstance(reason, str) or len(reason) > MAX_REASON_CHARS \
                or not isinstance(at, int | float) or isinstance(at, bool) or not math.isfinite(at):
            raise TriggerRefused("malformed", f"expected a string id, a short string reason and a time 'at', got "
                                 f"id={request_id!r} at={at!r} reason={str(reason)[:40]!r}")
        if self.token:
            given = body.get("hmac")
            if not isinstance(given, str) or not given:
                raise TriggerRefused("unsigned", "no hmac, and api_token is set (`loraloop retrain` signs its "
                                     "requests when LORALOOP_API_TOKEN is set)")
            if not hmac.compare_digest(given.encode(), sign(self.token, body).encode()):
                raise TriggerRefused("bad_signature", f"hmac {given[:12]!r}... does not match the body "
                                     f"(id {request_id!r}) signed with api_token")
            now = time.time()
            if not now - TRIGGER_MAX_AGE_S <= at <= now + TRIGGER_MAX_SKEW_S:
                raise TriggerRefused("stale", f"requested at {at:.0f}, now {now:.0f}: outside the "
                                     f"{TRIGGER_MAX_AGE_S:.0f} s window")
            if request_id in self._seen:
                raise TriggerRefused("replayed", f"request {request_id!r} was already taken")
            self._seen[request_id] = None
            while len(self._seen) > _SEEN_LIMIT:
                self._seen.popitem(last=False)
        return body

    def _remove(self, path: str) -> None:
        try:
            self.fs.rm(path)
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as e:  # fsspec refuses a directory with a ValueError
            logger.error("cannot delete retrain request %s (ignored from now on): %s", path, e)
            self._stuck.add(path)

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.learner_triggers.labels(outcome=outcome).inc()


def _read_local(path: str) -> bytes:
    """A local trigger file, never following a link nor blocking on a FIFO."""
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise TriggerRefused("malformed", f"not a regular file (mode {stat.filemode(st.st_mode)})")
    if st.st_size > TRIGGER_MAX_BYTES:
        raise TriggerRefused("malformed", f"{st.st_size} bytes, over the {TRIGGER_MAX_BYTES}-byte limit")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise TriggerRefused("malformed", f"cannot open as a regular file ({e.strerror})") from e
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise TriggerRefused("malformed", "replaced by something other than a regular file")
        return f.read(TRIGGER_MAX_BYTES + 1)
