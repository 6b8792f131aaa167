"""In-memory request log and feedback buffer: the embedded default (one process)."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Collection

from loraloop.buffer.base import Claim, FeedbackBuffer, RequestLog
from loraloop.buffer.replay import ReplayReservoir
from loraloop.schemas import Example, ServedRequest


class MemoryRequestLog(RequestLog):
    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._items: OrderedDict[str, tuple[float, ServedRequest]] = OrderedDict()
        self._lock = threading.Lock()

    def record(self, served: list[ServedRequest]) -> None:
        now = time.monotonic()
        with self._lock:
            for s in served:
                self._items[s.request_id] = (now + self.ttl_s, s)
                self._items.move_to_end(s.request_id)
            while self._items and next(iter(self._items.values()))[0] < now:  # oldest first: expire
                self._items.popitem(last=False)

    def get(self, request_id: str) -> ServedRequest | None:
        with self._lock:
            item = self._items.get(request_id)
        if item is None or item[0] < time.monotonic():
            return None
        return item[1]


class MemoryFeedbackBuffer(FeedbackBuffer):
    """One process's buffer; entries older than ``retention_s`` (user text) are dropped and counted."""

    def __init__(self, max_items: int, trim: str, replay_per_label: int, claim_idle_s: float,
                 dedup_ttl_s: float, seed: int = 0, retention_s: float = float("inf")) -> None:
        self.max_items, self.trim, self.claim_idle_s, self.dedup_ttl_s = max_items, trim, claim_idle_s, dedup_ttl_s
        self.retention_s = retention_s
        self._queue: OrderedDict[str, Example] = OrderedDict()
        self._claims: dict[str, tuple[float, list[tuple[str, Example]]]] = {}
        self._appended_at: OrderedDict[str, float] = OrderedDict()  # entry id -> unix time appended, oldest first
        self._seen: dict[str, float] = {}
        self._reservoir = ReplayReservoir(replay_per_label, random.Random(seed))
        self._lock = threading.Lock()
        self._dropped: Counter[str] = Counter()
        self.dropped = 0  # drop_oldest drops in all (kept for callers that read it)

    def append(self, example: Example) -> str:
        now = time.monotonic()
        with self._lock:
            self._expire()
            if self._seen.get(example.event_id, 0) > now:
                return "duplicate"
            if self._depth() >= self.max_items:
                if self.trim == "reject" or not self._queue:
                    return "full"
                entry_id, _ = self._queue.popitem(last=False)
                self._appended_at.pop(entry_id, None)
                self.dropped += 1
                self._dropped["drop_oldest"] += 1
            self._seen[example.event_id] = now + self.dedup_ttl_s
            entry_id = uuid.uuid4().hex
            self._queue[entry_id] = example
            self._appended_at[entry_id] = time.time()
            return "appended"

    def claim(self, consumer: str, max_items: int) -> Claim:
        now = time.monotonic()
        with self._lock:
            self._expire()
            taken: list[tuple[str, Example]] = []
            for claim_id, (at, items) in list(self._claims.items()):  # expired claims come back first
                if at + self.claim_idle_s <= now and len(taken) < max_items:
                    del self._claims[claim_id]
                    taken.extend(items)
            while self._queue and len(taken) < max_items:
                taken.append(self._queue.popitem(last=False))
            claim_id = uuid.uuid4().hex
            if taken:
                self._claims[claim_id] = (now, taken)
            return Claim(claim_id, [e for _, e in taken], tuple(i for i, _ in taken))

    def acknowledge(self, claim: Claim, remember: bool = True, quarantine: Collection[str] = (),
                    release: Collection[str] = ()) -> None:
        with self._lock:
            entry = self._claims.pop(claim.claim_id, None)
            if entry is None:
                return  # already acknowledged, or expired and handed out again
            released = set(release)
            for entry_id, example in reversed(entry[1]):  # back at the front, in their order, with their age
                if example.event_id in released:
                    self._queue[entry_id] = example
                    self._queue.move_to_end(entry_id, last=False)
                else:
                    self._appended_at.pop(entry_id, None)
            if not remember:
                return  # quarantined
            suspect = set(quarantine) | released
            for _, example in entry[1]:
                if example.event_id not in suspect:
                    self._reservoir.offer(example, time.time())

    def _expire(self, reservoir: bool = False) -> None:
        """Drop entries (queued or claimed), and with ``reservoir`` replay examples, older than the retention.

        The reservoir is scanned whole, so only where it is read (a sample) or counted, not on every append.
        """
        if self.retention_s == float("inf"):
            return
        cutoff = time.time() - self.retention_s
        old = set()
        for entry_id, at in self._appended_at.items():  # oldest first: stop at the first one to keep
            if at >= cutoff:
                break
            old.add(entry_id)
        if old:
            for entry_id in old:
                self._queue.pop(entry_id, None)
                del self._appended_at[entry_id]
            for claim_id, (at, items) in list(self._claims.items()):  # unacknowledged claims hold text too
                kept = [(i, e) for i, e in items if i not in old]
                if kept:
                    self._claims[claim_id] = (at, kept)
                else:
                    del self._claims[claim_id]
            self._dropped["retention"] += len(old)
        expired = self._reservoir.expire(cutoff) if reservoir else 0
        if expired:
            self._dropped["replay_retention"] += expired

    def _depth(self) -> int:
        return len(self._queue) + sum(len(items) for _, items in self._claims.values())

    def depth(self) -> int:
        with self._lock:
            self._expire()
            return self._depth()

    def pending(self) -> int:
        with self._lock:
            self._expire()
            return len(self._queue)

    def remember(self, examples: list[Example]) -> None:
        with self._lock:
            for example in examples:
                self._reservoir.offer(example, time.time())

    def replay_sample(self, n: int, seed: int) -> list[Example]:
        with self._lock:
            self._expire(reservoir=True)
            return self._reservoir.sample(n, seed)

    def take_dropped(self) -> dict[str, int]:
        with self._lock:
            self._expire(reservoir=True)
            dropped, self._dropped = dict(self._dropped), Counter()
            return dropped
