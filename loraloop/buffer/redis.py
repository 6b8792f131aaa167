"""Redis request log and feedback buffer.

The buffer is a Redis Stream read through a consumer group: ``claim`` is XAUTOCLAIM
(claims idle longer than ``claim_idle_s``: a learner that died mid-cycle) followed by
XREADGROUP; ``acknowledge`` is XACK + XDEL, after which the labelled examples are
offered to a per-label replay reservoir (one list per label). Event ids are
deduplicated with SET NX + TTL. Stream, group and pending list survive a Redis restart
with append-only persistence; the client retries across a restart.

Durability: :meth:`RedisFeedbackBuffer.durability` reads the server's persistence
(CONFIG GET, or INFO persistence where CONFIG is disabled) and version; an append is
confirmed on disk by WAITAOF on Redis >= 7.2, by the fsync before the reply under
``appendfsync always``, or by WAIT on a replica. User text is bounded in time: each
append trims stream entries older than the retention (XTRIM MINID, acknowledged or not),
and reservoir entries carry the time they were stored and are dropped when older.
"""

from __future__ import annotations

import json
import logging
import random
import time
import uuid
from collections import Counter
from collections.abc import Collection

from loraloop.buffer.base import BufferError, Claim, Durability, FeedbackBuffer, RequestLog
from loraloop.buffer.replay import balanced_sample
from loraloop.schemas import Example, ServedRequest

logger = logging.getLogger(__name__)

GROUP = "learners"
WAIT_TIMEOUT_MS = 2000  # longest an append waits for its fsync (WAITAOF) or a replica (WAIT)
INSTANCE_CACHE_S = 1.0
SWEEP_EVERY_S = 60.0  # how often take_dropped drops expired reservoir entries that no sample read
STORED_AT = "_stored_at"  # field added to a reservoir entry: unix time it was stored (ignored by Example)


def connect(url: str):
    """A redis-py client that retries briefly across connection loss (a Redis restart), never a refused password."""
    import redis
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    class _AuthRefused(redis.RedisError):
        """Carries an AuthenticationError past the retry loop: redis-py files it under ConnectionError."""

    class _RetryButAuth(Retry):
        # A wrong password is a configuration error, not an outage: retrying it only delays the error.
        def call_with_retry(self, do, fail, *args, **kwargs):
            def once():
                try:
                    return do()
                except redis.AuthenticationError as e:
                    raise _AuthRefused(str(e)) from e
            try:
                return super().call_with_retry(once, fail, *args, **kwargs)
            except _AuthRefused as e:
                raise e.__cause__ from None

    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=3,
                                retry=_RetryButAuth(ExponentialBackoff(cap=1.0, base=0.05), 8),
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


def _server_info(client) -> dict:
    return client.info("server")


class RedisRequestLog(RequestLog):
    def __init__(self, client, prefix: str, ttl_s: int) -> None:
        self.client, self.prefix, self.ttl_s = client, prefix, ttl_s
        self._started: tuple[float, float | None] = (-float("inf"), None)  # (checked at, started at)

    @_wrap("request log info")
    def started_at(self) -> float | None:
        """Unix time the Redis server started (INFO server uptime), cached for a second."""
        checked, started = self._started
        if time.monotonic() - checked >= INSTANCE_CACHE_S:
            started = time.time() - float(_server_info(self.client)["uptime_in_seconds"])
            self._started = (time.monotonic(), started)
        return started

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


# Retention: entries older than ARGV[5] ms by the server's clock (entry ids are its
# milliseconds) leave the pending list (XACK, so a claim does not count them) and the stream
# (XTRIM MINID), claimed or not. Then dedup (SET NX), bound (reject: forget the id again, so a
# later retry is not a duplicate; or drop the oldest) and append, as one atomic step: no
# reader sees the id without the entry. Returns the outcome and how many entries drop_oldest
# and the retention removed, so both are counted.
_EXPIRE_LUA = """
local function expire(stream, group, retention_ms)
  if retention_ms <= 0 then return 0 end
  local t = redis.call('TIME')
  local minid = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - retention_ms
  if minid <= 0 then return 0 end
  local pending = redis.pcall('XPENDING', stream, group, '-', '(' .. minid, 10000)
  if type(pending) == 'table' and not pending.err then
    for _, p in ipairs(pending) do redis.call('XACK', stream, group, p[1]) end
  end
  return redis.call('XTRIM', stream, 'MINID', minid)
end
"""

_APPEND_LUA = _EXPIRE_LUA + """
local expired = expire(KEYS[2], ARGV[6], tonumber(ARGV[5]))
if not redis.call('SET', KEYS[1], 1, 'NX', 'EX', ARGV[1]) then return {'duplicate', 0, expired} end
local dropped = 0
if redis.call('XLEN', KEYS[2]) >= tonumber(ARGV[2]) then
  if ARGV[3] == 'reject' then redis.call('DEL', KEYS[1]); return {'full', 0, expired} end
  dropped = redis.call('XTRIM', KEYS[2], 'MAXLEN', tonumber(ARGV[2]) - 1)
end
redis.call('XADD', KEYS[2], '*', 'e', ARGV[4])
return {'appended', dropped, expired}
"""

# Acknowledge and delete the claim's entries (ARGV[3..2+n]); append the released ones (the rest of ARGV) again
# when at least one entry was still this group's to acknowledge.
_RELEASE_LUA = """
local n, acked = tonumber(ARGV[2]), 0
for first = 1, n, 1000 do  -- in slices: unpack() is bounded by Lua's C stack
  local ids = {}
  for i = first, math.min(n, first + 999) do ids[#ids + 1] = ARGV[2 + i] end
  acked = acked + redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
  redis.call('XDEL', KEYS[1], unpack(ids))
end
if acked > 0 then
  for i = 3 + n, #ARGV do redis.call('XADD', KEYS[1], '*', 'e', ARGV[i]) end
end
return acked
"""

_TRIM_LUA = _EXPIRE_LUA + """
return expire(KEYS[1], ARGV[2], tonumber(ARGV[1]))
"""


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def probe_durability(client) -> Durability:
    """How this Redis keeps an acknowledged write: see :class:`~loraloop.buffer.base.Durability`.

    CONFIG may be renamed or disabled (managed Redis): then INFO persistence tells whether
    the append-only file is on, and ``appendfsync`` is taken as the default ``everysec``.
    """
    import redis

    server = _server_info(client)
    version = tuple(int(p) for p in str(server.get("redis_version", "0")).split(".")[:2] if p.isdigit())
    try:
        config = client.config_get("append*")
        aof, fsync = _text(config.get("appendonly", "no")) == "yes", _text(config.get("appendfsync", "everysec"))
        source = "CONFIG"
    except redis.ResponseError:
        aof, fsync, source = bool(int(client.info("persistence").get("aof_enabled", 0))), "everysec", "INFO"
    replicas = int(client.info("replication").get("connected_slaves", 0))
    where = f"redis {server.get('redis_version')} (appendonly {'yes' if aof else 'no'}, appendfsync {fsync}, " \
            f"{replicas} replicas; read by {source})"
    if aof and version >= (7, 2):
        return Durability("waitaof", True, f"{where}: WAITAOF confirms each append is fsynced")
    if aof and fsync == "always":
        return Durability("aof_always", True, f"{where}: every write is fsynced before its reply")
    if replicas:
        return Durability("replica", True, f"{where}: WAIT confirms a replica holds each append")
    if aof:
        return Durability("aof_everysec", True, f"{where}: appends reach the append-only file before their reply "
                          "and survive a killed Redis; a host crash may lose the last second (no WAITAOF before 7.2)")
    return Durability("none", False, f"{where}: no persistence, a Redis restart loses the buffer")


class RedisFeedbackBuffer(FeedbackBuffer):
    def __init__(self, client, prefix: str, max_items: int, trim: str, replay_per_label: int,
                 claim_idle_s: float, dedup_ttl_s: int, seed: int = 0, retention_s: float = float("inf")) -> None:
        self.client, self.prefix = client, prefix
        self.max_items, self.trim, self.per_label = max_items, trim, replay_per_label
        self.claim_idle_ms, self.dedup_ttl_s = int(claim_idle_s * 1000), dedup_ttl_s
        self.retention_s = retention_s
        self._retention_ms = 0 if retention_s == float("inf") else max(1, int(retention_s * 1000))
        self.stream = f"{prefix}:feedback:stream"
        self._rng = random.Random(seed)
        self._group_ready = False
        self._append_script = client.register_script(_APPEND_LUA)
        self._trim_script = client.register_script(_TRIM_LUA)
        self._release_script = client.register_script(_RELEASE_LUA)
        self._durability: Durability | None = None
        self._dropped: Counter[str] = Counter()
        self._sweep_at = 0.0

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

    @_wrap("durability probe")
    def durability(self) -> Durability:
        self._durability = probe_durability(self.client)
        return self._durability

    @_wrap("instance id")
    def instance_id(self) -> str | None:
        return str(_server_info(self.client).get("run_id"))

    @_wrap("buffer append")
    def append(self, example: Example) -> str:
        return self.append_many([example])[0]

    @_wrap("buffer append")
    def append_many(self, examples: list[Example]) -> list[str]:
        """Dedup, bound and append each example atomically (one script call each), one round trip in all.

        Returns only once the appends are as durable as the server allows (WAITAOF or WAIT, see
        :func:`probe_durability`): the caller may then commit the offsets of the events.

        Raises:
            BufferError: Redis is down, or did not confirm the appends durable within the wait.
        """
        if not examples:
            return []
        self._ensure_group()
        with self.client.pipeline(transaction=False) as pipe:
            for example in examples:
                self._append_script(keys=[f"{self.prefix}:feedback:seen:{example.event_id}", self.stream],
                                    args=[self.dedup_ttl_s, self.max_items, self.trim, example.to_bytes(),
                                          self._retention_ms, GROUP], client=pipe)
            results = pipe.execute()
        statuses = []
        for result in results:
            status, dropped, expired = (_text(result[0]), int(result[1]), int(result[2])) \
                if isinstance(result, list) else (_text(result), 0, 0)
            self._dropped["drop_oldest"] += dropped
            self._dropped["retention"] += expired
            statuses.append(status)
        if "appended" in statuses:
            self._confirm_durable()
        return statuses

    def _confirm_durable(self) -> None:
        durability = self._durability or self.durability()
        if durability.mode == "waitaof":
            local, _ = self.client.execute_command("WAITAOF", 1, 0, WAIT_TIMEOUT_MS)
            if int(local) < 1:
                raise BufferError(f"redis did not confirm the appends fsynced within {WAIT_TIMEOUT_MS} ms "
                                  f"(WAITAOF answered {local})")
        elif durability.mode == "replica":
            acked = self.client.execute_command("WAIT", 1, WAIT_TIMEOUT_MS)
            if int(acked) < 1:
                raise BufferError(f"no replica confirmed the appends within {WAIT_TIMEOUT_MS} ms (WAIT answered "
                                  f"{acked})")

    def _trim_expired(self) -> None:
        if self._retention_ms:
            self._dropped["retention"] += int(self._trim_script(keys=[self.stream], args=[self._retention_ms, GROUP]))

    @_wrap("buffer claim")
    def claim(self, consumer: str, max_items: int) -> Claim:
        self._ensure_group()
        self._trim_expired()
        entries: list[tuple[bytes, dict]] = []
        reclaimed = self.client.xautoclaim(self.stream, GROUP, consumer, self.claim_idle_ms, "0-0", count=max_items)
        entries.extend(e for e in reclaimed[1] if e[1])  # deleted (trimmed) entries come back empty
        if len(entries) < max_items:
            fresh = self.client.xreadgroup(GROUP, consumer, {self.stream: ">"}, count=max_items - len(entries))
            for _, items in fresh or []:
                entries.extend(items)
        ids = tuple(i.decode() if isinstance(i, bytes) else i for i, _ in entries)
        examples = [Example.model_validate_json(fields[b"e"] if b"e" in fields else fields["e"])
                    for _, fields in entries]
        return Claim(uuid.uuid4().hex, examples, ids)

    @_wrap("buffer acknowledge")
    def acknowledge(self, claim: Claim, remember: bool = True, quarantine: Collection[str] = (),
                    release: Collection[str] = ()) -> None:
        if not claim.ids:
            return
        self._ensure_group()
        released = set(release)
        again = [e.to_bytes() for e in claim.examples if e.event_id in released]
        # One script: the released examples are appended again only if this claim still held its entries,
        # and never without the acknowledgement (a crash between the two would train them twice).
        acked = int(self._release_script(keys=[self.stream], args=[GROUP, len(claim.ids), *claim.ids, *again]))
        if again and acked:
            self._confirm_durable()
        if acked and remember:
            suspect = set(quarantine) | released
            for example in claim.examples:
                if example.event_id not in suspect:
                    self._offer(example)

    def _offer(self, example: Example) -> None:
        if example.label is None or self.per_label <= 0:
            return
        key = f"{self.prefix}:replay:{example.label}"
        entry = json.dumps({**json.loads(example.to_bytes()), STORED_AT: time.time()}).encode()
        seen = self.client.hincrby(f"{self.prefix}:replay:seen", example.label, 1)
        self.client.sadd(f"{self.prefix}:replay:labels", example.label)
        if self.client.llen(key) < self.per_label:
            self.client.rpush(key, entry)
        else:
            j = self._rng.randrange(seen)
            if j < self.per_label:
                self.client.lset(key, j, entry)

    @_wrap("buffer depth")
    def depth(self) -> int:
        self._trim_expired()
        return int(self.client.xlen(self.stream))

    @_wrap("buffer pending")
    def pending(self) -> int:
        self._ensure_group()
        self._trim_expired()
        claimed = self.client.xpending(self.stream, GROUP)["pending"]
        return max(0, int(self.client.xlen(self.stream)) - int(claimed))

    @_wrap("replay remember")
    def remember(self, examples: list[Example]) -> None:
        for example in examples:
            self._offer(example)

    @_wrap("replay sample")
    def replay_sample(self, n: int, seed: int) -> list[Example]:
        labels = sorted(x.decode() for x in self.client.smembers(f"{self.prefix}:replay:labels"))
        by_label = {label: self._replay_entries(label) for label in labels}
        return balanced_sample(by_label, n, seed)

    def _replay_entries(self, label: str) -> list[Example]:
        """The label's reservoir, without (and removing) entries stored longer ago than the retention."""
        key = f"{self.prefix}:replay:{label}"
        cutoff = time.time() - self.retention_s
        kept = []
        for raw in self.client.lrange(key, 0, -1):
            obj = json.loads(raw)
            stored_at = obj.get(STORED_AT, obj.get("ts"))  # an entry stored without the field: its event time
            if stored_at is not None and stored_at < cutoff:
                self._dropped["replay_retention"] += int(self.client.lrem(key, 1, raw))
            else:
                kept.append(Example.model_validate_json(raw))
        return kept

    @_wrap("buffer trim")
    def take_dropped(self) -> dict[str, int]:
        self._trim_expired()
        if self._retention_ms and time.monotonic() >= self._sweep_at:  # the reservoir is read whole: not often
            self._sweep_at = time.monotonic() + min(SWEEP_EVERY_S, self.retention_s / 4)
            for label in self.client.smembers(f"{self.prefix}:replay:labels"):
                self._replay_entries(_text(label))
        dropped, self._dropped = {k: v for k, v in self._dropped.items() if v}, Counter()
        return dropped
