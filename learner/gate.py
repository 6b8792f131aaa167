"""The promotion gate: a pure decision on evaluation figures.

A candidate is promoted only when

* on the **golden set** (when configured) it loses at most ``tolerance``,
* on the learner's **reference set** (requests never trained on, see
  :func:`learner.dataset.is_reference`) it does not lose more than ``tolerance`` with a
  paired test significant at ``alpha`` (the rows are few; a 2-row swing is noise),
* on the **holdout** (recent feedback nobody trained on) it does not lose more than
  ``tolerance`` with a paired test significant at ``alpha`` either (one row of a 46-row
  holdout is 2.2 points, and noise),
* on **labels the active version already knew** (the holdout rows of those labels) it
  does not lose more than ``tolerance`` with a paired test significant at ``alpha``: the
  forgetting guard (two rows of 41 rejected clean candidates before the test).

Without the pairs of a set, the tolerance alone decides there.

Golden and reference sets come first because they are the checks that do not trust the
claim being trained on: a candidate that fails the golden set, or the reference set at
``quarantine_alpha``, marks the claim's feedback as **suspect** (the learner then keeps it
out of the replay reservoir). A poisoned claim poisons its own holdout too, and there the
candidate looks better. (The learner's screen, run before training, catches the common
poisoning pattern first: :mod:`learner.screen`.)

Example:
    >>> decide(Scores(holdout=0.9, known=0.88, golden=None, n_holdout=50, n_known=40),
    ...        Scores(holdout=0.7, known=0.9, golden=None, n_holdout=50, n_known=40), tolerance=0.02)
    GateDecision(promote=True, reason='holdout 0.700 -> 0.900; known labels 0.900 -> 0.880', suspect_feedback=False)
    >>> decide(Scores(0.9, 0.8, None, 50, 40), Scores(0.7, 0.9, None, 50, 40), tolerance=0.02).reason
    'forgets known labels: 0.900 -> 0.800 (tolerance 0.02)'
    >>> decide(Scores(0.804, 0.9, None, 46, 40), Scores(0.826, 0.9, None, 46, 40), tolerance=0.02,
    ...        pairs=Pairs(holdout=Paired(candidate_only=0, active_only=1))).promote  # 1 row of 46: noise
    True
    >>> d = decide(Scores(1.0, 1.0, None, reference=0.5, n_reference=100),
    ...            Scores(0.4, 0.9, None, reference=0.8, n_reference=100), tolerance=0.02,
    ...            pairs=Pairs(reference=Paired(candidate_only=2, active_only=32)))
    >>> d.promote, d.suspect_feedback, d.reason
    (False, True, 'worse on the reference set: 0.800 -> 0.500 (32 rows lost, 2 won, p=3.5e-08)')
"""

from __future__ import annotations

from dataclasses import dataclass

from loraloop.stats import paired_worse_p_value


@dataclass(frozen=True)
class Scores:
    """Accuracy of one model on the cycle's evaluation sets (None: set empty or absent)."""

    holdout: float | None
    known: float | None
    golden: float | None
    n_holdout: int = 0
    n_known: int = 0
    reference: float | None = None
    n_reference: int = 0

    def as_dict(self) -> dict[str, float | int | None]:
        return {"holdout": self.holdout, "known": self.known, "golden": self.golden, "reference": self.reference,
                "n_holdout": self.n_holdout, "n_known": self.n_known, "n_reference": self.n_reference}


@dataclass(frozen=True)
class Paired:
    """Rows of one evaluation set that exactly one of candidate and active version gets right."""

    candidate_only: int
    active_only: int


@dataclass(frozen=True)
class Pairs:
    """The paired comparison of candidate and active version on each evaluation set (None: not compared)."""

    reference: Paired | None = None
    holdout: Paired | None = None
    known: Paired | None = None


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str
    suspect_feedback: bool = False  # lost on data outside the claim: keep the claim out of the reservoir


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _paired_loss(name: str, candidate: float | None, active: float | None, tolerance: float,
                 pairs: Paired | None, alpha: float) -> tuple[str, float] | None:
    """(reason, p-value) when ``candidate`` loses beyond ``tolerance`` and significantly at ``alpha``, else None.

    Without the pairs the tolerance alone decides (p-value 0).
    """
    if candidate is None or active is None or candidate >= active - tolerance:
        return None
    p, detail = 0.0, ""
    if pairs is not None:
        p = paired_worse_p_value(new_only=pairs.candidate_only, old_only=pairs.active_only)
        if p >= alpha:
            return None
        detail = f" ({pairs.active_only} rows lost, {pairs.candidate_only} won, p={p:.2g})"
    return f"worse on the {name}: {_fmt(active)} -> {_fmt(candidate)}{detail}", p


def decide(candidate: Scores, active: Scores | None, tolerance: float, pairs: Pairs = Pairs(),
           alpha: float = 0.05, quarantine_alpha: float = 0.005) -> GateDecision:
    """Promote or reject ``candidate`` against ``active`` (None: nothing is live yet).

    A reference-set loss marks the claim's feedback suspect only when its p-value is below
    ``quarantine_alpha``: a clean claim whose candidate lost a few reference rows to new labels
    is rejected, but its examples still teach later cycles.
    """
    if candidate.holdout is None and candidate.golden is None and candidate.reference is None:
        return GateDecision(False, "nothing to evaluate on: no holdout, golden or reference set")
    if active is None:
        return GateDecision(True, f"first version: holdout {_fmt(candidate.holdout)}")
    if candidate.golden is not None and active.golden is not None and candidate.golden < active.golden - tolerance:
        return GateDecision(False, f"worse on the golden set: {_fmt(active.golden)} -> {_fmt(candidate.golden)} "
                                   f"(tolerance {tolerance:g})", suspect_feedback=True)
    reference_loss = _paired_loss("reference set", candidate.reference, active.reference, tolerance,
                                  pairs.reference, alpha)
    if reference_loss:
        reason, p = reference_loss
        return GateDecision(False, reason, suspect_feedback=p < quarantine_alpha)
    holdout_loss = _paired_loss("holdout", candidate.holdout, active.holdout, tolerance, pairs.holdout, alpha)
    if holdout_loss:
        return GateDecision(False, holdout_loss[0])
    known_loss = _paired_loss("known labels", candidate.known, active.known, tolerance, pairs.known, alpha)
    if known_loss:
        return GateDecision(False, f"forgets {known_loss[0].removeprefix('worse on the ')} (tolerance {tolerance:g})")
    parts = [f"holdout {_fmt(active.holdout)} -> {_fmt(candidate.holdout)}"]
    for name, cand, act in (("golden", candidate.golden, active.golden),
                            ("reference", candidate.reference, active.reference),
                            ("known labels", candidate.known, active.known)):
        if cand is not None:
            parts.append(f"{name} {_fmt(act)} -> {_fmt(cand)}")
    return GateDecision(True, "; ".join(parts))
