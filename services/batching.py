"""Micro-batching decisions of the inference worker: no I/O of their own, clock and poll injected.

They live here so they can be unit-tested without a model or a broker:

* :class:`BatchPolicy` — how long to keep polling for more requests once the first one
  of a micro-batch arrived (``max_batch`` records or ``max_wait_ms`` after the first,
  whichever comes first), and :func:`collect`, which applies it to any ``poll`` function.
* :func:`isolate_failures` — when a batch step (tokenizer, forward pass) raises, which
  requests made it raise: the batch is bisected until every failing request stands alone,
  so one poison request costs about ``2 log2(n)`` extra calls and never its neighbours' answers.
* :func:`plan_chunks` — how to split one micro-batch into forward passes. Dynamic
  padding pads every row to the longest one, so one long text in a batch of short
  ones multiplies the work. Sorting the batch by token length and cutting it where the
  padding saved outweighs the fixed cost of one more forward pass gives the same
  predictions for less compute (measured in ``benchmarks/worker_throughput.py``).

Example:
    >>> policy = BatchPolicy(max_batch=4, max_wait_ms=10)
    >>> policy.wait_ms(collected=1, first_at=0.0, now=0.004)
    6
    >>> policy.wait_ms(collected=4, first_at=0.0, now=0.004)
    0
    >>> plan_chunks([3, 40, 4, 41], max_chunk=4, overhead_tokens=8)
    [[0, 2], [1, 3]]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class BatchPolicy:
    """When a micro-batch is complete.

    Args:
        max_batch: most requests in one micro-batch.
        max_wait_ms: longest wait for more requests after the first one arrived.
    """

    max_batch: int
    max_wait_ms: int

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")

    def room(self, collected: int) -> int:
        """How many more requests fit in the micro-batch."""
        return max(0, self.max_batch - collected)

    def wait_ms(self, collected: int, first_at: float, now: float) -> int:
        """Milliseconds to keep polling for more (0: the micro-batch is complete).

        Args:
            collected: requests gathered so far (at least the first one).
            first_at: time (seconds, any monotonic clock) the first request was gathered.
            now: the current time on the same clock.
        """
        if self.room(collected) == 0:
            return 0
        left = self.max_wait_ms - (now - first_at) * 1000.0
        return max(0, math.ceil(left)) if left > 0 else 0


def plan_chunks(lengths: Sequence[int], max_chunk: int, overhead_tokens: float) -> list[list[int]]:
    """Split a micro-batch into forward passes of similar length, minimising padded work.

    The cost model of one forward pass over ``n`` rows padded to ``L`` tokens is
    ``overhead_tokens + n * L``: linear in padded tokens (the encoder's matmuls) plus a
    fixed per-call cost expressed in tokens (framework overhead; about 40 tokens for
    MiniLM on a CPU core, far more on a GPU). Rows are sorted by length and cut into
    contiguous groups by dynamic programming, which is optimal for this cost model.

    Args:
        lengths: token count of each request, in arrival order.
        max_chunk: most rows in one forward pass.
        overhead_tokens: fixed cost of one forward pass; ``math.inf`` keeps one chunk.

    Returns:
        Lists of indices into ``lengths``, each sorted by length, shortest chunk first.
    """
    n = len(lengths)
    if n == 0:
        return []
    if max_chunk < 1:
        raise ValueError(f"max_chunk must be >= 1, got {max_chunk}")
    order = sorted(range(n), key=lambda i: lengths[i])
    if math.isinf(overhead_tokens):  # "never split": fewest passes, max_chunk rows each
        return [order[i:i + max_chunk] for i in range(0, n, max_chunk)]
    sorted_lengths = [lengths[i] for i in order]
    best = [0.0] + [math.inf] * n  # best[j]: cheapest plan for the j shortest rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = sorted_lengths[j - 1]  # sorted, so the last row of a group sets its padding
        for i in range(max(0, j - max_chunk), j):
            cost = best[i] + overhead_tokens + (j - i) * longest
            if cost < best[j]:
                best[j], cut[j] = cost, i
    chunks: list[list[int]] = []
    j = n
    while j > 0:
        chunks.append(order[cut[j]:j])
        j = cut[j]
    return chunks[::-1]


def isolate_failures(items: Sequence[T], run: Callable[[list[T]], list[R]]
                     ) -> tuple[list[tuple[T, R]], list[tuple[T, Exception]]]:
    """Run ``items`` as one batch; when that raises, bisect until each failing item stands alone.

    ``run`` maps a batch to one result per item, in order (a result list of another length
    counts as a failure of that batch). Halves are retried independently, so the items that
    do not make ``run`` raise all get their result: with ``f`` failing items among ``n`` the
    cost is at most about ``2 f log2(n)`` extra calls, and ``2n - 1`` calls when every item fails.

    Args:
        items: the batch, in order.
        run: the batch step (tokenize + forward pass); any ``Exception`` is caught, others propagate.

    Returns:
        ``(item, result)`` for the items that succeeded and ``(item, error)`` for those that
        failed alone, each in the order of ``items``.

    Example:
        >>> def run(batch):
        ...     if 3 in batch:
        ...         raise ValueError("3 is poison")
        ...     return [x * 10 for x in batch]
        >>> done, failed = isolate_failures([1, 2, 3, 4], run)
        >>> done, [(x, str(e)) for x, e in failed]
        ([(1, 10), (2, 20), (4, 40)], [(3, '3 is poison')])
    """
    done: list[tuple[int, R]] = []
    failed: list[tuple[int, Exception]] = []
    pending: list[tuple[int, int]] = [(0, len(items))] if items else []  # [start, stop) slices still to run
    while pending:
        start, stop = pending.pop()
        batch = list(items[start:stop])
        try:
            results = run(batch)
            if len(results) != len(batch):
                raise ValueError(f"batch step returned {len(results)} results for {len(batch)} items")
        except Exception as e:
            if stop - start == 1:
                failed.append((start, e))
            else:
                middle = (start + stop) // 2
                pending.extend([(middle, stop), (start, middle)])
            continue
        done.extend(zip(range(start, stop), results, strict=True))
    done.sort(key=lambda pair: pair[0])
    failed.sort(key=lambda pair: pair[0])
    return [(items[i], r) for i, r in done], [(items[i], e) for i, e in failed]


def collect(poll: Callable[[int, int], list[T]], policy: BatchPolicy, idle_ms: int,
            clock: Callable[[], float]) -> list[T]:
    """Gather one micro-batch from ``poll(timeout_ms, max_records)`` under ``policy``.

    Waits up to ``idle_ms`` for a first record, then keeps polling until the batch is
    full, ``policy.max_wait_ms`` passed since the first record, or a poll comes back empty.
    ``poll`` and ``clock`` are injected, so the decision is testable without a broker.
    """
    batch = list(poll(idle_ms, policy.max_batch))
    if not batch:
        return batch
    first_at = clock()
    while (wait := policy.wait_ms(len(batch), first_at, clock())) > 0:
        more = poll(wait, policy.room(len(batch)))
        if not more:
            break
        batch.extend(more)
    return batch
