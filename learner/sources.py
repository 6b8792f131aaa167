"""Per-source caps: how much of one cycle a single source of feedback may contribute.

A feedback event may name its ``source`` (a user, client or annotator id). However honest most
users are, one source that sends most of a cycle's feedback decides what that cycle learns; a
poisoning account, a buggy client replaying its events, or one annotator's private convention
would each become the model. So a source contributes at most ``max_share`` of a claim's examples
(never fewer than :data:`SOURCE_FLOOR`, so a small claim from one user still trains). The rest
is **deferred**, not lost: it goes back into the buffer and waits for later cycles, where the same
cap applies again. Events without a source are not capped (the field is optional).

Example:
    >>> from loraloop.schemas import Example
    >>> def ex(i, source):
    ...     return Example(event_id=f"e{i}", request_id=f"r{i}", text="t", kind="label", label="a",
    ...                    served_label="a", adapter_version="v1", source=source)
    >>> claim = [ex(i, "mallory") for i in range(60)] + [ex(100 + i, f"u{i}") for i in range(20)]
    >>> claim += [ex(200 + i, None) for i in range(20)]
    >>> kept, deferred = cap_sources(claim, max_share=0.25)
    >>> len(kept), len(deferred), {e.source for e in deferred}
    (65, 35, {'mallory'})
    >>> cap_sources(claim, max_share=1.0)[1]
    []
"""

from __future__ import annotations

import math
from collections import Counter

from loraloop.schemas import Example

# A cycle always takes this many examples from any one source: capping a claim of a dozen
# corrections from the only user active that hour would only delay learning, and a dozen
# examples cannot outweigh the replayed reservoir a cycle trains on beside them.
SOURCE_FLOOR = 20


def source_limit(claim_size: int, max_share: float) -> int:
    """The most examples one source may contribute to a claim of ``claim_size`` examples.

    Example:
        >>> source_limit(100, 0.25), source_limit(30, 0.25), source_limit(1000, 0.5)
        (25, 20, 500)
    """
    return max(SOURCE_FLOOR, math.ceil(max_share * claim_size))


def cap_sources(examples: list[Example], max_share: float) -> tuple[list[Example], list[Example]]:
    """Split ``examples`` into (kept, deferred): each source's oldest ``source_limit`` examples are kept.

    Order is kept within both lists; ``max_share >= 1`` keeps everything.
    """
    if max_share >= 1 or not examples:
        return list(examples), []
    limit = source_limit(len(examples), max_share)
    by_source = Counter(e.source for e in examples if e.source is not None)
    if not by_source or max(by_source.values()) <= limit:
        return list(examples), []
    oldest_first = sorted(range(len(examples)), key=lambda i: (examples[i].ts, i))
    taken: Counter = Counter()
    deferred_at: set[int] = set()
    for i in oldest_first:
        source = examples[i].source
        if source is None:
            continue
        taken[source] += 1
        if taken[source] > limit:
            deferred_at.add(i)
    kept = [e for i, e in enumerate(examples) if i not in deferred_at]
    deferred = [e for i, e in enumerate(examples) if i in deferred_at]
    return kept, deferred


def deferred_by_source(deferred: list[Example]) -> dict[str, int]:
    """Source -> examples deferred, for the cycle record."""
    return dict(sorted(Counter(e.source for e in deferred).items()))
