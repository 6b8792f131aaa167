"""In-memory request log and feedback buffer: the embedded default (one process)."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import OrderedDict
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
    def __init__(self, max_items: int, trim: str, replay_per_label: int, claim_idle_s: float,
                 dedup_ttl_s: float, seed: int = 0) -> None:
        self.max_items, self.trim, self.claim_idle_s, self.dedup_ttl_s = max_items, trim, claim_idle_s, dedup_ttl_s
        self._queue: OrderedDict[str, Example] = OrderedDict()
        self._claims: dict[str, tuple[float, list[tuple[str, Example]]]] = {}
        self._seen: dict[str, float] = {}
        self._reservoir = ReplayReservoir(replay_per_label, random.Random(seed))
        self._lock = threading.Lock()
        self.dropped = 0

    def append(self, example: Example) -> str:
        now = time.monotonic()
        with self._lock:
            if self._seen.get(example.event_id, 0) > now:
                return "duplicate"
            if self._depth() >= self.max_items:
                if self.trim == "reject" or not self._queue:
                    return "full"
                self._queue.popitem(last=False)
                self.dropped += 1
            self._seen[example.event_id] = now + self.dedup_ttl_s
            self._queue[uuid.uuid4().hex] = example
            return "appended"

    def claim(self, consumer: str, max_items: int) -> Claim:
        now = time.monotonic()
        with self._lock:
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

    def acknowledge(self, claim: Claim, remember: bool = True, quarantine: Collection[str] = ()) -> None:
        with self._lock:
            entry = self._claims.pop(claim.claim_id, None)
            if entry is None or not remember:
                return  # already acknowledged, or expired and handed out again; or quarantined
            suspect = set(quarantine)
            for _, example in entry[1]:
                if example.event_id not in suspect:
                    self._reservoir.offer(example)

    def _depth(self) -> int:
        return len(self._queue) + sum(len(items) for _, items in self._claims.values())

    def depth(self) -> int:
        with self._lock:
            return self._depth()

    def pending(self) -> int:
        with self._lock:
            return len(self._queue)

    def remember(self, examples: list[Example]) -> None:
        with self._lock:
            for example in examples:
                self._reservoir.offer(example)

    def replay_sample(self, n: int, seed: int) -> list[Example]:
        with self._lock:
            return self._reservoir.sample(n, seed)
