"""The worker's micro-batching decisions: batch policy, collect loop, length chunking."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from services.batching import BatchPolicy, collect, isolate_failures, plan_chunks


def test_policy_waits_until_full_or_deadline() -> None:
    policy = BatchPolicy(max_batch=8, max_wait_ms=5)
    assert policy.wait_ms(1, first_at=10.0, now=10.0) == 5
    assert policy.wait_ms(3, first_at=10.0, now=10.0021) == 3  # rounds up: never stops early
    assert policy.wait_ms(3, first_at=10.0, now=10.005) == 0
    assert policy.wait_ms(8, first_at=10.0, now=10.0) == 0  # full
    assert policy.room(3) == 5 and policy.room(9) == 0
    assert BatchPolicy(max_batch=4, max_wait_ms=0).wait_ms(1, 0.0, 0.0) == 0


@pytest.mark.parametrize(("batch", "wait"), [(0, 5), (4, -1)])
def test_policy_refuses_bad_limits(batch: int, wait: int) -> None:
    with pytest.raises(ValueError, match=f"got {batch if batch < 1 else wait}"):
        BatchPolicy(max_batch=batch, max_wait_ms=wait)


class _FakeSource:
    """A poll function over a scripted arrival schedule and a fake clock that advances with each wait."""

    def __init__(self, arrivals: list[tuple[float, int]]) -> None:
        self.now = 0.0
        self.arrivals = list(arrivals)  # (time, record)
        self.calls: list[tuple[int, int]] = []

    def poll(self, timeout_ms: int, max_records: int) -> list[int]:
        self.calls.append((timeout_ms, max_records))
        deadline = self.now + timeout_ms / 1000
        ready = [r for t, r in self.arrivals if t <= self.now]
        if not ready:
            upcoming = [t for t, _ in self.arrivals if t <= deadline]
            self.now = min(upcoming) if upcoming else deadline
            ready = [r for t, r in self.arrivals if t <= self.now]
        taken = ready[:max_records]
        self.arrivals = [(t, r) for t, r in self.arrivals if r not in taken]
        return taken

    def clock(self) -> float:
        return self.now


def test_collect_fills_the_batch_without_waiting_when_records_are_there() -> None:
    source = _FakeSource([(0.0, i) for i in range(20)])
    batch = collect(source.poll, BatchPolicy(max_batch=8, max_wait_ms=50), 100, source.clock)
    assert batch == list(range(8)) and source.now == 0.0


def test_collect_waits_at_most_max_wait_after_the_first_record() -> None:
    source = _FakeSource([(0.010, 0), (0.012, 1), (0.030, 2)])
    batch = collect(source.poll, BatchPolicy(max_batch=8, max_wait_ms=5), 100, source.clock)
    assert batch == [0, 1]  # record 2 arrives 20 ms after the first: next batch
    assert source.now == pytest.approx(0.015)
    assert source.calls[0] == (100, 8) and source.calls[1] == (5, 7)


def test_collect_returns_empty_after_the_idle_timeout() -> None:
    source = _FakeSource([])
    assert collect(source.poll, BatchPolicy(max_batch=8, max_wait_ms=5), 100, source.clock) == []
    assert source.now == pytest.approx(0.1)


def _cost(lengths: list[int], chunks: list[list[int]], overhead: float) -> float:
    return sum(overhead + len(c) * max(lengths[i] for i in c) for c in chunks)


def _brute_force(lengths: list[int], max_chunk: int, overhead: float) -> float:
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    best = math.inf
    for cuts in itertools.product([False, True], repeat=len(order) - 1):
        chunks, current = [], [order[0]]
        for cut, i in zip(cuts, order[1:], strict=True):
            if cut:
                chunks.append(current)
                current = []
            current.append(i)
        chunks.append(current)
        if max(len(c) for c in chunks) <= max_chunk:
            best = min(best, _cost(lengths, chunks, overhead))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_plan_chunks_is_a_partition_and_optimal(seed: int) -> None:
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(5, 20), rng.randint(40, 128)]) for _ in range(rng.randint(1, 10))]
    max_chunk, overhead = rng.randint(1, 6), rng.choice([0.5, 8.0, 40.0])
    chunks = plan_chunks(lengths, max_chunk, overhead)
    assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))
    assert all(1 <= len(c) <= max_chunk for c in chunks)
    assert _cost(lengths, chunks, overhead) == pytest.approx(_brute_force(lengths, max_chunk, overhead))


def test_plan_chunks_edge_cases() -> None:
    assert plan_chunks([], 8, 40) == []
    assert plan_chunks([5, 9, 7], 8, math.inf) == [[0, 2, 1]]  # one pass, sorted
    assert sorted(len(c) for c in plan_chunks([10] * 5, 2, 1000)) == [1, 2, 2]  # max_chunk still holds
    assert plan_chunks([5, 9, 7], 2, math.inf) == [[0, 2], [1]]
    assert plan_chunks([10, 10, 120], 8, 40.0) == [[0, 1], [2]]  # the long one alone: 60+160 < 40+360
    with pytest.raises(ValueError, match="max_chunk must be >= 1, got 0"):
        plan_chunks([1], 0, 1.0)


class _Step:
    """A batch step that raises when its batch holds a poison item, and counts its calls."""

    def __init__(self, poison: set[int]) -> None:
        self.poison, self.calls = poison, 0

    def __call__(self, batch: list[int]) -> list[int]:
        self.calls += 1
        bad = self.poison & set(batch)
        if bad:
            raise RuntimeError(f"poison {sorted(bad)}")
        return [x * 10 for x in batch]


@pytest.mark.parametrize("seed", range(8))
def test_isolate_failures_answers_every_innocent_item_and_isolates_each_poison(seed: int) -> None:
    rng = random.Random(seed)
    items = list(range(rng.randint(1, 40)))
    poison = set(rng.sample(items, rng.randint(0, min(3, len(items)))))
    step = _Step(poison)
    done, failed = isolate_failures(items, step)
    assert done == [(x, x * 10) for x in items if x not in poison]  # in order, each once
    assert [x for x, _ in failed] == sorted(poison)
    assert all(isinstance(e, RuntimeError) and f"poison [{x}]" == str(e) for x, e in failed)  # each failed alone
    if not poison:
        assert step.calls == 1
    else:  # bisection: about 2 log2(n) calls per poison item, far fewer than one call per item
        assert step.calls <= 1 + 2 * len(poison) * math.ceil(math.log2(max(2, len(items))))


def test_isolate_failures_when_every_item_fails_or_the_step_miscounts() -> None:
    step = _Step(set(range(8)))
    done, failed = isolate_failures(list(range(8)), step)
    assert done == [] and [x for x, _ in failed] == list(range(8)) and step.calls == 15  # 2n - 1
    done, failed = isolate_failures([1, 2, 3], lambda batch: batch[:1])  # one result for many items
    assert done == [(1, 1), (2, 2), (3, 3)] and failed == []  # alone, each result matches its item
    done, failed = isolate_failures([1], lambda batch: [])
    assert done == [] and "returned 0 results for 1 items" in str(failed[0][1])
    assert isolate_failures([], _Step(set())) == ([], [])


def test_isolate_failures_lets_keyboard_interrupt_through() -> None:
    def interrupted(batch: list[int]) -> list[int]:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        isolate_failures([1, 2], interrupted)
