"""The replay reservoir: a per-label balanced sample of past examples, against forgetting.

Example:
    >>> import random
    >>> from loraloop.schemas import Example
    >>> r = ReplayReservoir(per_label=2, rng=random.Random(0))
    >>> for i in range(10):
    ...     r.offer(Example(event_id=str(i), request_id=str(i), text=f"t{i}", kind="label",
    ...                     label="ab"[i % 2], served_label="a", adapter_version="v"))
    >>> sorted(len(v) for v in r.by_label.values())
    [2, 2]
    >>> sorted(e.label for e in r.sample(4, seed=1))
    ['a', 'a', 'b', 'b']
"""

from __future__ import annotations

import random

from loraloop.schemas import Example


class ReplayReservoir:
    """Reservoir sampling (Algorithm R) per label; thumbs-down examples (no label) are not kept.

    Each kept example remembers when it was stored, so that :meth:`expire` can drop user
    text older than the retention (``request_text_retention_s``).
    """

    def __init__(self, per_label: int, rng: random.Random) -> None:
        self.per_label = per_label
        self.rng = rng
        self.by_label: dict[str, list[Example]] = {}
        self.stored_at: dict[str, list[float]] = {}
        self.seen: dict[str, int] = {}

    def offer(self, example: Example, now: float = 0.0) -> None:
        if example.label is None or self.per_label <= 0:
            return
        label = example.label
        kept = self.by_label.setdefault(label, [])
        times = self.stored_at.setdefault(label, [])
        self.seen[label] = self.seen.get(label, 0) + 1
        if len(kept) < self.per_label:
            kept.append(example)
            times.append(now)
        else:
            j = self.rng.randrange(self.seen[label])
            if j < self.per_label:
                kept[j], times[j] = example, now

    def expire(self, before: float) -> int:
        """Drop examples stored before ``before`` (unix time); return how many."""
        dropped = 0
        for label, kept in self.by_label.items():
            times = self.stored_at[label]
            keep = [i for i, t in enumerate(times) if t >= before]
            dropped += len(kept) - len(keep)
            self.by_label[label] = [kept[i] for i in keep]
            self.stored_at[label] = [times[i] for i in keep]
        return dropped

    def sample(self, n: int, seed: int) -> list[Example]:
        return balanced_sample(self.by_label, n, seed)


def balanced_sample(by_label: dict[str, list[Example]], n: int, seed: int) -> list[Example]:
    """Up to ``n`` examples, round-robin over labels (sorted), each label's order shuffled by ``seed``."""
    rng = random.Random(seed)
    pools = {label: rng.sample(items, len(items)) for label, items in sorted(by_label.items()) if items}
    out: list[Example] = []
    while len(out) < n and pools:
        for label in list(pools):
            if len(out) >= n:
                break
            out.append(pools[label].pop())
            if not pools[label]:
                del pools[label]
    return out
