"""The feedback screen: a pure check, before training, for a label that feedback is being pushed onto.

A poisoning burst that relabels many requests to one target label leaves a trace the gate
cannot see (the candidate trained on it may be no worse on clean data) but the live model
can: most of the texts now labelled with the target are ones it confidently files under
other labels. Honest corrections of a label look like that label's ordinary error rate.

The screen judges only labels the live version demonstrably knows: on its reference rows
(requests no version trains on), the one-sided 95% upper confidence bound of its error rate
(Clopper-Pearson) is below ``min_share``. A label first fitted from a handful of examples is
not known yet: the live version files most of its texts elsewhere, so nearly all its honest
corrections are contested, exactly as a burst's are. Judging it would set aside the examples
that would teach it, every cycle; until it is known it is never judged.

For every known label, the screen counts how many of the claim's judgements of that label
(corrections and confirmations) the live version assigns to another label (``contested``), and
tests that count against the rate expected for the label: the largest of the claim's own
contested rate on the other labels (users who mostly correct mistakes raise it for every label
alike), the upper bound of the label's reference error rate, and a floor for label noise. A
label is flagged when the one-sided binomial test is significant at ``alpha`` divided by the
number of labels tested (Bonferroni) and most of its rows are contested (``min_share``). The
contested rows of a flagged label are suspect: not trained on, not evaluated on, kept out of
the replay reservoir. Its uncontested rows, and every other label, are used as usual.

Example:
    >>> rows = [Judged(f"p{i}", "card_lost", "exchange_rate") for i in range(30)]
    >>> rows += [Judged(f"c{i}", "top_up", "top_up") for i in range(40)] + [Judged("x", "top_up", "card_lost")]
    >>> reference = [("card_lost", "card_lost")] * 10 + [("top_up", "top_up")] * 10
    >>> result = screen(rows, reference, alpha=0.001, min_share=0.5)
    >>> sorted(result.flagged), len(result.suspect)
    (['card_lost'], 30)
    >>> result.flagged["card_lost"].contested, result.flagged["card_lost"].rows
    (30, 30)
    >>> screen(rows, reference=[], alpha=0.001, min_share=0.5).flagged  # no evidence that card_lost is known
    {}
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from scipy.stats import beta

from loraloop.stats import binomial_upper_p_value

MIN_EXPECTED_RATE = 0.02  # label noise alone contests a few rows of every label
# Confidence of the bound on a label's reference error rate that decides whether the live version knows it:
# five reference rows, all right, are enough (bound 0.45); four are not (0.53).
KNOWN_CONFIDENCE = 0.95


@dataclass(frozen=True)
class Judged:
    """One correction as the live version sees it: the user's label and the live version's."""

    event_id: str
    label: str
    predicted: str


@dataclass(frozen=True)
class Flag:
    rows: int
    contested: int
    expected_rate: float
    p_value: float

    def describe(self, label: str) -> str:
        return (f"{label}: {self.contested}/{self.rows} contested, expected {self.expected_rate:.2f}, "
                f"p={self.p_value:.2g}")


@dataclass
class ScreenResult:
    suspect: set[str] = field(default_factory=set)  # event ids
    flagged: dict[str, Flag] = field(default_factory=dict)

    @property
    def reason(self) -> str:
        return "; ".join(flag.describe(label) for label, flag in sorted(self.flagged.items()))


def error_upper_bound(errors: int, rows: int, confidence: float = KNOWN_CONFIDENCE) -> float:
    """One-sided Clopper-Pearson upper bound of an error rate seen as ``errors`` of ``rows`` (1.0 without rows).

    Example:
        >>> round(error_upper_bound(0, 5), 3), round(error_upper_bound(1, 20), 3), error_upper_bound(0, 0)
        (0.451, 0.216, 1.0)
    """
    if rows <= 0 or errors >= rows:
        return 1.0
    return float(beta.ppf(confidence, errors + 1, rows - errors))


def reference_bounds(reference: list[tuple[str, str]]) -> dict[str, float]:
    """Per label: the upper bound of the live version's error rate on its reference rows."""
    rows, errors = Counter(), Counter()
    for label, predicted in reference:
        rows[label] += 1
        errors[label] += label != predicted
    return {label: error_upper_bound(errors[label], rows[label]) for label in rows}


def screen(rows: list[Judged], reference: list[tuple[str, str]], alpha: float, min_share: float) -> ScreenResult:
    """Flag labels whose corrections the live version contests far more than usual.

    ``rows``: the claim's judgements (corrections and confirmations) of labels in the live label
    map. ``reference``: (label, live prediction) on the reference set. Returns the suspect event
    ids and the flagged labels; a label the reference set does not show the live version to know
    is never flagged.
    """
    result = ScreenResult()
    by_label: dict[str, list[Judged]] = {}
    for row in rows:
        by_label.setdefault(row.label, []).append(row)
    if not by_label or alpha <= 0:
        return result
    bounds = reference_bounds(reference)
    contested = {label: [r for r in mine if r.predicted != label] for label, mine in by_label.items()}
    total_rows, total_contested = len(rows), sum(map(len, contested.values()))
    known = [label for label in by_label if bounds.get(label, 1.0) < min_share]
    level = alpha / max(1, len(known))
    for label in known:
        n, k = len(by_label[label]), len(contested[label])
        if k < min_share * n:
            continue
        others = total_rows - n
        claim_rate = (total_contested - k) / others if others else 0.0
        expected = max(claim_rate, bounds[label], MIN_EXPECTED_RATE)
        p = binomial_upper_p_value(k, n, expected)
        if p < level:
            result.flagged[label] = Flag(rows=n, contested=k, expected_rate=expected, p_value=p)
            result.suspect.update(r.event_id for r in contested[label])
    return result
