"""Pure pieces of the drift scenario: which labels are known, the request stream, the users.

Shared by ``loraloop demo`` and ``benchmarks/drift.py``; no I/O, seeded.

Example:
    >>> rows = [(f"t{i}", "abcde"[i % 5]) for i in range(50)]
    >>> plan = DriftPlan.split(sorted({l for _, l in rows}), known_fraction=0.6, seed=0)
    >>> len(plan.known), len(plan.new)
    (3, 2)
    >>> stream = plan.stream(rows, n_requests=30, seed=0)
    >>> {l for _, l, phase in stream if phase == 0} <= set(plan.known)
    True
"""

from __future__ import annotations

import random
from dataclasses import dataclass

PHASES = ("known labels only", "half known, half new", "all labels")


@dataclass(frozen=True)
class DriftPlan:
    known: tuple[str, ...]
    new: tuple[str, ...]

    @classmethod
    def split(cls, labels: list[str], known_fraction: float, seed: int) -> DriftPlan:
        """Shuffle the labels; the first ``known_fraction`` are known at the start."""
        if not 0 < known_fraction < 1:
            raise ValueError(f"known_fraction must be in (0, 1), got {known_fraction}")
        shuffled = sorted(labels)
        random.Random(seed).shuffle(shuffled)
        cut = max(1, min(len(shuffled) - 1, round(len(shuffled) * known_fraction)))
        return cls(tuple(shuffled[:cut]), tuple(shuffled[cut:]))

    def stream(self, rows: list[tuple[str, str]], n_requests: int, seed: int) -> list[tuple[str, str, int]]:
        """``n_requests`` (text, label, phase) in three equal phases (see :data:`PHASES`).

        Phase 0 draws known labels only; phase 1 draws a known or a new label with equal
        odds; phase 2 draws uniformly over all labels. Texts are drawn with replacement
        from the rows of the chosen label.
        """
        rng = random.Random(seed)
        by_label: dict[str, list[str]] = {}
        for text, label in rows:
            by_label.setdefault(label, []).append(text)
        known = [label for label in self.known if label in by_label]
        new = [label for label in self.new if label in by_label]
        every = known + new
        out: list[tuple[str, str, int]] = []
        for i in range(n_requests):
            phase = min(2, 3 * i // max(1, n_requests))
            if phase == 0 or not new:
                label = rng.choice(known)
            elif phase == 1:
                label = rng.choice(new if rng.random() < 0.5 else known)
            else:
                label = rng.choice(every)
            out.append((rng.choice(by_label[label]), label, phase))
        return out


@dataclass
class SimulatedUsers:
    """Users who judge a fraction of predictions, with a little label noise.

    For a judged prediction: when it is right, a ``thumbs_up`` (half the time) or the
    confirming ``label``; when it is wrong, the corrected ``label``. With probability
    ``noise`` the given label is a random wrong one. ``poison_target`` makes a share
    ``poison_share`` of the judged predictions a label event naming that label (an adversarial burst).
    """

    labels: list[str]
    feedback_fraction: float = 0.5
    noise: float = 0.05
    seed: int = 0
    poison_target: str | None = None
    poison_share: float = 1.0

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def judge(self, predicted: str, truth: str) -> tuple[str, str | None] | None:
        """(kind, label) for one prediction, or None when this user gives no feedback."""
        rng = self._rng
        if rng.random() >= self.feedback_fraction:
            return None
        if self.poison_target is not None and rng.random() < self.poison_share:
            return ("label", self.poison_target)
        given = truth
        if rng.random() < self.noise:
            given = rng.choice([label for label in self.labels if label != truth] or [truth])
        if predicted == given and rng.random() < 0.5:
            return ("thumbs_up", None)
        return ("label", given)


def split_rows(rows: list[tuple[str, str]], test_fraction: float, seed: int
               ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Deduplicate by text, then split into (train, test) stratified by label."""
    unique = list(dict(rows).items())
    rng = random.Random(seed)
    rng.shuffle(unique)
    by_label: dict[str, list[tuple[str, str]]] = {}
    for row in unique:
        by_label.setdefault(row[1], []).append(row)
    train: list[tuple[str, str]] = []
    test: list[tuple[str, str]] = []
    for label_rows in by_label.values():
        cut = max(1, int(len(label_rows) * test_fraction))
        test.extend(label_rows[:cut])
        train.extend(label_rows[cut:])
    return train, test


def rolling(values: list[float], window: int) -> list[float]:
    """Trailing mean of ``values`` over ``window`` items (shorter at the start).

    Example:
        >>> rolling([1, 0, 1, 1], 2)
        [1.0, 0.5, 0.5, 1.0]
    """
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out
