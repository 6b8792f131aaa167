"""Redis request log and feedback buffer.

The buffer is a Redis Stream read through a consumer group: ``claim`` is XAUTOCLAIM
(claims idle longer than ``claim_idle_s``: a learner that died mid-cycle) followed by
XREADGROUP; ``acknowledge`` is XACK + XDEL, after which the labelled examples are
offered to a per-label replay reservoir (one list per label). Event ids are
deduplicated with SET NX + TTL. Stream, group and pending list survive a Redis restart
with append-only persistence; the client retries across a restart.
"""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import Collection

from loraloop.buffer.base import BufferError, Claim, FeedbackBuffer, RequestLog
from loraloop.buffer.replay import balanced_sample
from loraloop.schemas import Example, ServedRequest

logger = logging.getLogger(__name__)

GROUP = "learners"


def connect(url: str):
    """A redis-py client that retries briefly across connection loss (a Redis restart)."""
    import redis
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=3,
                                retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 8),
                                retry_on_error=[redis.ConnectionError, redis.TimeoutError])


def _wrap(what: str):
    import redis

    def decorator(fn):
        def inner(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except redis.RedisError as e:
                raise BufferError(f"redis {what} failed: {e}") from e
        return inner
    return decorator


class RedisRequestLog(RequestLog):
    def __init__(self, client, prefix: str, ttl_s: int) -> None:
        self.client, self.prefix, self.ttl_s = client, prefix, ttl_s

    def _key(self, request_id: str) -> str:
        return f"{self.prefix}:req:{request_id}"

    @_wrap("request log write")
    def record(self, served: list[ServedRequest]) -> None:
        with self.client.pipeline(transaction=False) as pipe:
            for s in served:
                pipe.set(self._key(s.request_id), s.to_bytes(), ex=self.ttl_s)
            pipe.execute()

    @_wrap("request log read")
    def get(self, request_id: str) -> ServedRequest | None:
        raw = self.client.get(self._key(request_id))
        return ServedRequest.model_validate_json(raw) if raw else None

    @_wrap("request log read")
    def get_many(self, request_ids: list[str]) -> dict[str, ServedRequest]:
        ids = list(dict.fromkeys(request_ids))
        if not ids:
            return {}
        raws = self.client.mget([self._key(i) for i in ids])
        return {i: ServedRequest.model_validate_json(raw) for i, raw in zip(ids, raws, strict=True) if raw}


# Dedup (SET NX), bound (reject: forget the id again, so a later retry is not a duplicate; or
# drop the oldest) and append, as one atomic step: no reader sees the id without the entry.
_APPEND_LUA = """
if not redis.call('SET', KEYS[1], 1, 'NX', 'EX', ARGV[1]) then return 'duplicate' end
if redis.call('XLEN', KEYS[2]) >= tonumber(ARGV[2]) then
  if ARGV[3] == 'reject' then redis.call('DEL', KEYS[1]); return 'full' end
  redis.call('XTRIM', KEYS[2], 'MAXLEN', tonumber(ARGV[2]) - 1)
end
redis.call('XADD', KEYS[2], '*', 'e', ARGV[4])
return 'appended'
"""


class RedisFeedbackBuffer(FeedbackBuffer):
    def __init__(self, client, prefix: str, max_items: int, trim: str, replay_per_label: int,
                 claim_idle_s: float, dedup_ttl_s: int, seed: int = 0) -> None:
        self.client, self.prefix = client, prefix
        self.max_items, self.trim, self.per_label = max_items, trim, replay_per_label
        self.claim_idle_ms, self.dedup_ttl_s = int(claim_idle_s * 1000), dedup_ttl_s
        self.stream = f"{prefix}:feedback:stream"
        self._rng = random.Random(seed)
        self._group_ready = False
        self._append_script = client.register_script(_APPEND_LUA)

    def _ensure_group(self) -> None:
        import redis

        if self._group_ready:
            return
        try:
            self.client.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._group_ready = True

    @_wrap("buffer append")
    def append(self, example: Example) -> str:
        return self.append_many([example])[0]

    @_wrap("buffer append")
    def append_many(self, examples: list[Example]) -> list[str]:
        """Dedup, bound and append each example atomically (one script call each), one round trip in all."""
        if not examples:
            return []
        self._ensure_group()
        with self.client.pipeline(transaction=False) as pipe:
            for example in examples:
                self._append_script(keys=[f"{self.prefix}:feedback:seen:{example.event_id}", self.stream],
                                    args=[self.dedup_ttl_s, self.max_items, self.trim, example.to_bytes()],
                                    client=pipe)
            results = pipe.execute()
        return [r.decode() if isinstance(r, bytes) else str(r) for r in results]

    @_wrap("buffer claim")
    def claim(self, consumer: str, max_items: int) -> Claim:
        self._ensure_group()
        entries: list[tuple[bytes, dict]] = []
        reclaimed = self.client.xautoclaim(self.stream, GROUP, consumer, self.claim_idle_ms, "0-0", count=max_items)
        entries.extend(e for e in reclaimed[1] if e[1])  # deleted entries come back empty
        if len(entries) < max_items:
            fresh = self.client.xreadgroup(GROUP, consumer, {self.stream: ">"}, count=max_items - len(entries))
            for _, items in fresh or []:
                entries.extend(items)
        ids = tuple(i.decode() if isinstance(i, bytes) else i for i, _ in entries)
        examples = [Example.model_validate_json(fields[b"e"] if b"e" in fields else fields["e"])
                    for _, fields in entries]
        return Claim(uuid.uuid4().hex, examples, ids)

    @_wrap("buffer acknowledge")
    def acknowledge(self, claim: Claim, remember: bool = True, quarantine: Collection[str] = ()) -> None:
        if not claim.ids:
            return
        self._ensure_group()
        acked = self.client.xack(self.stream, GROUP, *claim.ids)
        self.client.xdel(self.stream, *claim.ids)
        if acked and remember:
            suspect = set(quarantine)
            for example in claim.examples:
                if example.event_id not in suspect:
                    self._offer(example)

    def _offer(self, example: Example) -> None:
        if example.label is None or self.per_label <= 0:
            return
        key = f"{self.prefix}:replay:{example.label}"
        seen = self.client.hincrby(f"{self.prefix}:replay:seen", example.label, 1)
        self.client.sadd(f"{self.prefix}:replay:labels", example.label)
        if self.client.llen(key) < self.per_label:
            self.client.rpush(key, example.to_bytes())
        else:
            j = self._rng.randrange(seen)
            if j < self.per_label:
                self.client.lset(key, j, example.to_bytes())

    @_wrap("buffer depth")
    def depth(self) -> int:
        return int(self.client.xlen(self.stream))

    @_wrap("buffer pending")
    def pending(self) -> int:
        self._ensure_group()
        claimed = self.client.xpending(self.stream, GROUP)["pending"]
        return max(0, int(self.client.xlen(self.stream)) - int(claimed))

    @_wrap("replay remember")
    def remember(self, examples: list[Example]) -> None:
        for example in examples:
            self._offer(example)

    @_wrap("replay sample")
    def replay_sample(self, n: int, seed: int) -> list[Example]:
        labels = sorted(x.decode() for x in self.client.smembers(f"{self.prefix}:replay:labels"))
        by_label = {label: [Example.model_validate_json(raw) for raw in
                            self.client.lrange(f"{self.prefix}:replay:{label}", 0, -1)] for label in labels}
        return balanced_sample(by_label, n, seed)
