"""The promotion gate: a pure decision on evaluation figures.

A candidate is promoted only when

* on the **holdout** (recent feedback nobody trained on) it is at least as good as the
  active version,
* on the **golden set** (when configured) it loses at most ``tolerance``,
* on **labels the active version already knew** (the replay holdout plus the holdout rows
  of those labels) it loses at most ``tolerance``: the forgetting guard.

Example:
    >>> decide(Scores(holdout=0.9, known=0.88, golden=None, n_holdout=50, n_known=40),
    ...        Scores(holdout=0.7, known=0.9, golden=None, n_holdout=50, n_known=40), tolerance=0.02)
    GateDecision(promote=True, reason='holdout 0.700 -> 0.900; known labels 0.900 -> 0.880')
    >>> decide(Scores(0.9, 0.8, None, 50, 40), Scores(0.7, 0.9, None, 50, 40), tolerance=0.02).reason
    'forgets known labels: 0.900 -> 0.800 (tolerance 0.02)'
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Scores:
    """Accuracy of one model on the cycle's evaluation sets (None: set empty or absent)."""

    holdout: float | None
    known: float | None
    golden: float | None
    n_holdout: int = 0
    n_known: int = 0

    def as_dict(self) -> dict[str, float | int | None]:
        return {"holdout": self.holdout, "known": self.known, "golden": self.golden,
                "n_holdout": self.n_holdout, "n_known": self.n_known}


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def decide(candidate: Scores, active: Scores | None, tolerance: float) -> GateDecision:
    """Promote or reject ``candidate`` against ``active`` (None: nothing is live yet)."""
    if candidate.holdout is None and candidate.golden is None:
        return GateDecision(False, "nothing to evaluate on: no holdout and no golden set")
    if active is None:
        return GateDecision(True, f"first version: holdout {_fmt(candidate.holdout)}")
    if candidate.holdout is not None and active.holdout is not None and candidate.holdout < active.holdout:
        return GateDecision(False, f"worse on the holdout: {_fmt(active.holdout)} -> {_fmt(candidate.holdout)}")
    if candidate.golden is not None and active.golden is not None and candidate.golden < active.golden - tolerance:
        return GateDecision(False, f"worse on the golden set: {_fmt(active.golden)} -> {_fmt(candidate.golden)} "
                                   f"(tolerance {tolerance:g})")
    if candidate.known is not None and active.known is not None and candidate.known < active.known - tolerance:
        return GateDecision(False, f"forgets known labels: {_fmt(active.known)} -> {_fmt(candidate.known)} "
                                   f"(tolerance {tolerance:g})")
    parts = [f"holdout {_fmt(active.holdout)} -> {_fmt(candidate.holdout)}"]
    if candidate.golden is not None:
        parts.append(f"golden {_fmt(active.golden)} -> {_fmt(candidate.golden)}")
    if candidate.known is not None:
        parts.append(f"known labels {_fmt(active.known)} -> {_fmt(candidate.known)}")
    return GateDecision(True, "; ".join(parts))
