"""Probation: a promoted version serves under judgement until the guard keeps it, rolls it back, or time runs out.

The state lives in ``pointer.json`` (:class:`~loraloop.registry.pointer.ActivePointer` fields
``probation``, ``last_probation``, ``last_kept`` and ``pending``), so it changes under the
pointer's own lock and generation: whoever ends a probation does so in the same atomic update
that checks the probation is still the one it judged (same version, same starting
generation). Two guards can therefore never both roll a version back; the loser's update is
refused and it learns that someone else decided.

Decisions (:data:`DECISIONS`):

* ``keep`` -- enough paired judgements and no regression: the version becomes ``last_kept``;
* ``rollback`` -- a regression: the pointer goes back to ``last_kept`` (not merely the previous
  version: a version that ended with ``insufficient_evidence`` was never kept);
* ``insufficient_evidence`` -- the probation limit passed without enough judgements: the
  version stays active but is not kept, and its paired evidence is carried into the next
  probation (``carried``), so that small regressions of unkept versions add up;
* ``superseded`` -- another promotion replaced it before any decision;
* ``manual`` -- an operator promoted or rolled back by hand (``loraloop adapters promote``):
  the operator's choice wins, is kept, and is recorded.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace

KEEP, ROLLBACK, INSUFFICIENT, SUPERSEDED, MANUAL = "keep", "rollback", "insufficient_evidence", "superseded", "manual"
DECISIONS = (KEEP, ROLLBACK, INSUFFICIENT, SUPERSEDED, MANUAL)
GUARD_DECISIONS = (KEEP, ROLLBACK, INSUFFICIENT)


@dataclass(frozen=True)
class ProbationTerms:
    """How long and on how much evidence a promotion is judged (from the ``guard_*`` settings).

    Args:
        window_s: the shortest probation (``guard_window_s``).
        limit_s: the longest (``guard_watch_limit_s``); then ``insufficient_evidence``.
        needed: paired judgements of the version itself before it can be kept (``guard_min_judged``).
    """

    window_s: float
    limit_s: float
    needed: int

    def __post_init__(self) -> None:
        if not (self.window_s > 0 and self.limit_s >= self.window_s and self.needed >= 1):
            raise ValueError(f"probation terms need 0 < window_s <= limit_s and needed >= 1, got {self}")


@dataclass(frozen=True)
class Probation:
    """One version's probation; ``decision`` is None while it is open."""

    version: str
    baseline: str  # the version it replaced: the one workers shadow-score
    last_kept: str | None  # where a rollback goes
    started_at: float
    window_s: float
    limit_s: float
    needed: int
    generation: int  # the pointer generation that started it
    carried: dict = field(default_factory=dict)  # paired evidence of unkept versions since last_kept
    decision: str | None = None
    reason: str = ""
    decided_at: float | None = None
    decided_by: str = ""
    evidence: dict = field(default_factory=dict)

    @property
    def deadline(self) -> float:
        return self.started_at + self.limit_s

    def remaining_s(self, now: float | None = None) -> float:
        return max(0.0, self.deadline - (time.time() if now is None else now))

    def is_open(self, now: float | None = None) -> bool:
        """Undecided and its limit not passed (after the limit, nothing holds the learner back)."""
        return self.decision is None and self.remaining_s(now) > 0

    def ended(self, decision: str, reason: str, evidence: dict, by: str, at: float | None = None) -> Probation:
        if decision not in DECISIONS:
            raise ValueError(f"unknown probation decision {decision!r}; expected one of {DECISIONS}")
        return replace(self, decision=decision, reason=reason, evidence=evidence, decided_by=by,
                       decided_at=time.time() if at is None else at)

    def carried_pairs(self) -> dict:
        """``pairs``, ``new_only``, ``old_only`` carried in, and the ``versions`` they came from."""
        c = self.carried or {}
        return {"pairs": float(c.get("pairs", 0.0)), "new_only": float(c.get("new_only", 0.0)),
                "old_only": float(c.get("old_only", 0.0)), "versions": list(c.get("versions", []))}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: object) -> Probation:
        """Parse a stored probation.

        Raises:
            ValueError: not an object, or a field missing or of the wrong type.
        """
        if not isinstance(data, dict):
            raise ValueError(f"probation is a {type(data).__name__}, expected an object")
        data = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for name in ("version", "baseline"):
            if not isinstance(data.get(name), str):
                raise ValueError(f"probation {name} {data.get(name)!r} is not a version name")
        for name in ("started_at", "window_s", "limit_s"):
            value = data.get(name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"probation {name} {value!r} is not a number")
        for name in ("needed", "generation"):
            value = data.get(name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"probation {name} {value!r} is not a non-negative integer")
        if data.get("last_kept") is not None and not isinstance(data["last_kept"], str):
            raise ValueError(f"probation last_kept {data['last_kept']!r} is not a version name")
        if data.get("decision") is not None and data["decision"] not in DECISIONS:
            raise ValueError(f"probation decision {data['decision']!r} is not one of {DECISIONS}")
        for name in ("carried", "evidence"):
            if not isinstance(data.get(name, {}), dict):
                raise ValueError(f"probation {name} is not an object")
        return cls(**data)


def paired_of(evidence: dict) -> dict:
    """The paired counts a guard decision recorded (``evidence["paired"]``), zeros when absent."""
    paired = evidence.get("paired") if isinstance(evidence, dict) else None
    paired = paired if isinstance(paired, dict) else {}
    return {k: float(paired.get(k, 0.0) or 0.0) for k in ("pairs", "new_only", "old_only")}


def probation_status(registry: object, now: float | None = None) -> dict | None:
    """What ``loraloop status`` shows of probation: the one in progress, the last ended one, last kept, pending.

    Args:
        registry: an :class:`~loraloop.registry.store.AdapterRegistry` (read only).
        now: unix time (default: now).

    Returns:
        None when nothing was ever on probation and nothing is pending; else a JSON-ready dict:
        ``current`` (version, baseline, last_kept, needed, time_left_s, and the guard's last
        progress: pairs, state, p_value, drop, evidence), ``last`` (version, decision, reason,
        decided_by, decided_at, evidence), ``last_kept`` and ``pending``.
    """
    pointer = registry.active()
    now = time.time() if now is None else now
    current = pointer.current_probation()
    last = Probation.from_dict(pointer.last_probation) if pointer.last_probation else None
    if current is None and last is None and pointer.pending is None:
        return None
    out: dict = {"current": None, "last": None, "last_kept": pointer.last_kept, "pending": pointer.pending}
    if current is not None:
        progress = registry.progress() or {}
        out["current"] = {"version": current.version, "baseline": current.baseline, "last_kept": current.last_kept,
                          "started_at": current.started_at, "needed": current.needed,
                          "time_left_s": round(current.remaining_s(now), 1), "open": current.is_open(now),
                          "carried": current.carried_pairs(), "pairs": progress.get("pairs", 0.0),
                          "state": progress.get("state"), "p_value": progress.get("p_value"),
                          "drop": progress.get("drop"), "by": progress.get("by"),
                          "evidence": progress.get("evidence")}
    if last is not None:
        out["last"] = {"version": last.version, "decision": last.decision, "reason": last.reason,
                       "decided_by": last.decided_by, "decided_at": last.decided_at, "evidence": last.evidence}
    return out
