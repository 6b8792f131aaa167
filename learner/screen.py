"""The feedback screen: a pure check, before training, for a label that feedback is being pushed onto.

A poisoning burst that relabels many requests to one target label leaves a trace the gate
cannot see (the candidate trained on it may be no worse on clean data) but the live model
can: most of the texts now labelled with the target are ones it confidently files under
other labels. Honest corrections of a label look like that label's ordinary error rate.

For every label the live version knows, the screen counts how many of the claim's
corrections to that label the live version assigns to another label (``contested``), and
tests that count against the rate expected for the label: the larger of the claim's own
contested rate on the other labels (users who mostly correct mistakes raise it for every
label alike) and the label's error rate on the reference set. A label is flagged when the
one-sided binomial test is significant at ``alpha`` divided by the number of labels tested
(Bonferroni) and most of its rows are contested (``min_share``). The contested rows of a
flagged label are suspect: not trained on, not evaluated on, kept out of the replay
reservoir. Its uncontested rows, and every other label, are used as usual.

Example:
    >>> rows = [Judged(f"p{i}", "card_lost", "exchange_rate") for i in range(30)]
    >>> rows += [Judged(f"c{i}", "top_up", "top_up") for i in range(40)] + [Judged("x", "top_up", "card_lost")]
    >>> result = screen(rows, reference=[], alpha=0.001, min_share=0.5)
    >>> sorted(result.flagged), len(result.suspect)
    (['card_lost'], 30)
    >>> result.flagged["card_lost"].contested, result.flagged["card_lost"].rows
    (30, 30)
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from loraloop.stats import binomial_upper_p_value

REFERENCE_PRIOR_ROWS = 5  # a label's few reference rows are shrunk toward the overall error rate
MIN_EXPECTED_RATE = 0.02  # label noise alone contests a few rows of every label


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


def _reference_rates(reference: list[tuple[str, str]]) -> tuple[dict[str, float], float]:
    """Per-label error rate on the reference set (shrunk toward the overall rate), and the overall rate."""
    if not reference:
        return {}, 0.0
    overall = sum(label != predicted for label, predicted in reference) / len(reference)
    rows, errors = Counter(), Counter()
    for label, predicted in reference:
        rows[label] += 1
        errors[label] += label != predicted
    rates = {label: (errors[label] + REFERENCE_PRIOR_ROWS * overall) / (rows[label] + REFERENCE_PRIOR_ROWS)
             for label in rows}
    return rates, overall


def screen(rows: list[Judged], reference: list[tuple[str, str]], alpha: float, min_share: float) -> ScreenResult:
    """Flag labels whose corrections the live version contests far more than usual.

    ``rows``: the claim's corrections to labels the live version knows. ``reference``: (label,
    live prediction) on the reference set. Returns the suspect event ids and the flagged labels.
    """
    result = ScreenResult()
    by_label: dict[str, list[Judged]] = {}
    for row in rows:
        by_label.setdefault(row.label, []).append(row)
    if not by_label or alpha <= 0:
        return result
    ref_rates, ref_overall = _reference_rates(reference)
    contested = {label: [r for r in mine if r.predicted != label] for label, mine in by_label.items()}
    total_rows, total_contested = len(rows), sum(map(len, contested.values()))
    level = alpha / len(by_label)
    for label, mine in by_label.items():
        n, k = len(mine), len(contested[label])
        if k < min_share * n:
            continue
        others = total_rows - n
        claim_rate = (total_contested - k) / others if others else 0.0
        expected = max(claim_rate, ref_rates.get(label, ref_overall), MIN_EXPECTED_RATE)
        p = binomial_upper_p_value(k, n, expected)
        if p < level:
            result.flagged[label] = Flag(rows=n, contested=k, expected_rate=expected, p_value=p)
            result.suspect.update(r.event_id for r in contested[label])
    return result
