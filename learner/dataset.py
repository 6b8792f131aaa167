"""Turning claimed feedback into a training set: pure, seeded, no I/O.

Order of work in a cycle (river's predict-then-learn): the buffer's new examples are
**resolved** per request (one verdict per request, see :func:`resolve`), the most recent
slice is kept aside as the **holdout**, and a **replay** sample of past examples is mixed in
against forgetting. A fixed share of requests, chosen by a hash of the request id
(:func:`is_reference`), is never trained on: once acknowledged, those examples are the
learner's own **reference set** (:func:`reference_rows`), on which a candidate must not lose
to the live version -- a defence that does not trust the claim being trained on. Replayed examples are never evaluated on: the live version may have
trained on them, which would flatter it against the candidate; forgetting is measured on
the holdout rows of labels the live version already knew (fresh data for both).

Thumbs-down events carry no correct label; they become :class:`Negative` rows (this
text is *not* the served label) used by the trainer's unlikelihood term.

Example:
    >>> from loraloop.schemas import Example
    >>> def ex(i, req, label, kind="label"):
    ...     return Example(event_id=str(i), request_id=req, text=f"t{req}", kind=kind, label=label,
    ...                    served_label="a", adapter_version="v1", ts=float(i))
    >>> rows, stats = resolve([ex(1, "r1", "b"), ex(2, "r1", "b"), ex(3, "r1", "c"), ex(4, "r2", "a")])
    >>> [(r.text, r.label) for r in rows], stats.conflicts_resolved
    ([('tr1', 'b'), ('tr2', 'a')], 1)
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from loraloop.schemas import Example


@dataclass(frozen=True)
class Labelled:
    """One training or evaluation row: a text and its correct label."""

    text: str
    label: str
    ts: float = 0.0


@dataclass(frozen=True)
class Negative:
    """A text users said is *not* ``label`` (a thumbs-down on the served label)."""

    text: str
    label: str
    ts: float = 0.0


@dataclass
class ResolveStats:
    requests: int = 0
    conflicts_resolved: int = 0  # several labels for one request, a majority won
    ambiguous_dropped: int = 0  # several labels, no majority: the request teaches nothing
    negatives: int = 0


@dataclass
class TrainingSet:
    """What one cycle trains and evaluates on."""

    train: list[Labelled] = field(default_factory=list)
    negatives: list[Negative] = field(default_factory=list)
    holdout: list[Labelled] = field(default_factory=list)  # recent new feedback, never trained on
    reference_held: int = 0  # claimed examples of reference requests: not used this cycle, reference later
    new_rows: int = 0
    replay_rows: int = 0
    stats: ResolveStats = field(default_factory=ResolveStats)
    window: tuple[float, float] = (0.0, 0.0)  # ts of the oldest and newest new example

    @property
    def labels(self) -> list[str]:
        """Labels with a positive example, in first-seen order."""
        seen: dict[str, None] = {}
        for row in self.train + self.holdout:
            seen.setdefault(row.label, None)
        return list(seen)


def resolve(examples: list[Example]) -> tuple[list[Labelled | Negative], ResolveStats]:
    """One verdict per request: the majority of its label events (thumbs-up counts for the served label).

    A request with a tie between labels is dropped as ambiguous (a burst of contradictory
    labels must not teach either). A request with only thumbs-down becomes a
    :class:`Negative` of the served label; thumbs-down next to a label event is superseded
    by the label. Rows come out in order of each request's latest event.
    """
    by_request: dict[str, list[Example]] = defaultdict(list)
    for example in examples:
        by_request[example.request_id].append(example)
    stats = ResolveStats(requests=len(by_request))
    rows: list[tuple[float, Labelled | Negative]] = []
    for events in by_request.values():
        latest = max(e.ts for e in events)
        text = events[-1].text
        votes = Counter(e.label for e in events if e.label is not None)
        if not votes:
            stats.negatives += 1
            rows.append((latest, Negative(text, events[-1].negative_label or events[-1].served_label, latest)))
            continue
        ranked = votes.most_common()
        if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
            stats.ambiguous_dropped += 1
            continue
        if len(ranked) > 1:
            stats.conflicts_resolved += 1
        rows.append((latest, Labelled(text, ranked[0][0], latest)))
    rows.sort(key=lambda pair: pair[0])
    return [row for _, row in rows], stats


def is_reference(request_id: str, share: float) -> bool:
    """Whether a request belongs to the reference set: a stable hash of its id, so every process agrees.

    Example:
        >>> sum(is_reference(f"req-{i}", 0.1) for i in range(10_000))
        1008
        >>> is_reference("req-1", 0.0)
        False
    """
    if share <= 0:
        return False
    digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < share


def split_reference(examples: list[Example], share: float) -> tuple[list[Example], list[Example]]:
    """(trainable, reference) examples of ``examples`` by :func:`is_reference` of their request."""
    trainable, reference = [], []
    for e in examples:
        (reference if is_reference(e.request_id, share) else trainable).append(e)
    return trainable, reference


def reference_rows(reservoir: list[Example], per_label: int) -> list[Labelled]:
    """Up to ``per_label`` rows per label of the reference examples in ``reservoir`` (its seeded order).

    Example:
        >>> ex = lambda i, y: Example(event_id=str(i), request_id=str(i), text=f"t{i}", kind="label", label=y,
        ...                           served_label=y, adapter_version="v")
        >>> [(r.text, r.label) for r in reference_rows([ex(0, "a"), ex(1, "a"), ex(2, "b")], per_label=1)]
        [('t0', 'a'), ('t2', 'b')]
    """
    taken: Counter[str] = Counter()
    out = []
    for e in reservoir:
        if e.label is not None and taken[e.label] < per_label:
            taken[e.label] += 1
            out.append(Labelled(e.text, e.label, e.ts))
    return out


def build_training_set(new: list[Example], replay: list[Example], holdout_fraction: float,
                       seed: int, reference_share: float = 0.0) -> TrainingSet:
    """Resolve the new examples, keep the most recent ``holdout_fraction`` aside, add the replay sample.

    Examples of reference requests (``reference_share``) are left out of training and holdout alike.
    """
    new, held = split_reference(new, reference_share)
    rows, stats = resolve(new)
    positives = [r for r in rows if isinstance(r, Labelled)]
    negatives = [r for r in rows if isinstance(r, Negative)]
    n_holdout = int(round(len(positives) * holdout_fraction)) if len(positives) >= 5 else 0
    cut = len(positives) - n_holdout
    replay_rows = [Labelled(e.text, e.label, e.ts) for e in replay if e.label is not None]
    random.Random(seed).shuffle(replay_rows)
    stamps = [e.ts for e in new] or [0.0]
    return TrainingSet(
        train=positives[:cut] + replay_rows,
        negatives=negatives,
        holdout=positives[cut:],
        new_rows=len(positives) + len(negatives),
        replay_rows=len(replay_rows),
        reference_held=len(held),
        stats=stats,
        window=(min(stamps), max(stamps)),
    )


def head_fit_rows(train: list[Labelled], reservoir: list[Example], per_label: int) -> list[Labelled]:
    """The rows the head is refitted on: ``train`` plus up to ``per_label`` reservoir examples per label, once each.

    A replay *sample* is small (it sets the cost of fine-tuning); the head's logistic
    regression is cheap, and refitting it on a few rows per old label loses what the live
    head knew. ``reservoir`` comes in the buffer's seeded order, so the cap keeps a seeded
    sample of each label.

    Example:
        >>> ex = lambda i, y: Example(event_id=str(i), request_id=str(i), text=f"t{i}", kind="label", label=y,
        ...                           served_label=y, adapter_version="v")
        >>> rows = head_fit_rows([Labelled("t0", "a")], [ex(0, "a"), ex(1, "a"), ex(2, "a"), ex(3, "b")], 1)
        >>> [(r.text, r.label) for r in rows]
        [('t0', 'a'), ('t1', 'a'), ('t3', 'b')]
    """
    out = list(train)
    seen = {(r.text, r.label) for r in train}
    taken: dict[str, int] = {}
    for e in reservoir:
        if e.label is None or (e.text, e.label) in seen or taken.get(e.label, 0) >= per_label:
            continue
        seen.add((e.text, e.label))
        taken[e.label] = taken.get(e.label, 0) + 1
        out.append(Labelled(e.text, e.label, e.ts))
    return out


def replay_size(new_rows: int, ratio: float, floor: int = 0) -> int:
    """How many replay examples to draw for ``new_rows`` new ones."""
    return max(floor, int(round(new_rows * ratio)))
