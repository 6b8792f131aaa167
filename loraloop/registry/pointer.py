"""Where the active adapter version and its history live: ``pointer.json`` in the registry.

The file is the single source of truth. It is replaced atomically under a lock (``flock``
on a local folder), and after every successful change a copy is written to
``pointer.json.last-good``: a damaged ``pointer.json`` is read from that copy (with an
error logged) and the next ``update`` writes a good file again.

With Redis configured, :class:`RedisPointerStore` keeps the file as the truth and adds a
copy of the pointer under a Redis key plus a pub/sub message on every change, so that
watchers wake at once instead of at their next poll. Readers always read the file: a
Redis restart without persistence loses nothing, and a raw ``SET`` + ``PUBLISH`` on an
unprotected Redis wakes watchers that then see an unchanged file (the disagreeing copy is
logged and overwritten from the file). While Redis is down, watchers poll the file.

A memory store serves tests and ``memory://`` registries. ``update`` is a
compare-and-swap, so two processes promoting at once never lose an update.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import fsspec

from loraloop.registry.errors import RegistryError

logger = logging.getLogger(__name__)

HISTORY_LIMIT = 50
LAST_GOOD_SUFFIX = ".last-good"
MAX_POINTER_BYTES = 1 << 20


@dataclass(frozen=True)
class ActivePointer:
    """The active version, a generation that grows on every change, and earlier actives."""

    version: str | None = None
    generation: int = 0
    history: tuple[str, ...] = ()
    reason: str = ""
    updated_at: float = 0.0
    sequence: int = 0  # last version number handed out, so ids are never reused
    # Probation (see loraloop.registry.probation): changed under the same lock and generation.
    last_kept: str | None = None  # the newest version a guard kept (or an operator chose): where rollbacks go
    pending: str | None = None  # a published candidate the learner holds until the probation ends
    probation: dict | None = None  # the open probation (Probation.to_dict())
    last_probation: dict | None = None  # the newest ended one, with its decision and evidence

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes | None) -> ActivePointer:
        """Parse and validate a pointer; an empty value is the initial pointer.

        Raises:
            ValueError: not JSON, not an object, or a field of the wrong type.
        """
        if not raw:
            return cls()
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError(f"pointer is a JSON {type(data).__name__}, expected an object")
        data = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        version, history = data.get("version"), data.get("history", [])
        # Types only: a malformed name is refused where it is used (fetch, promote), with its reason.
        if version is not None and not isinstance(version, str):
            raise ValueError(f"pointer version {version!r} is not a string")
        if not isinstance(history, list) or not all(isinstance(v, str) for v in history):
            raise ValueError(f"pointer history {history!r} is not a list of version names")
        for name in ("generation", "sequence"):
            value = data.get(name, 0)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"pointer {name} {value!r} is not a non-negative integer")
        if not isinstance(data.get("reason", ""), str) or not isinstance(data.get("updated_at", 0.0), int | float):
            raise ValueError(f"pointer reason/updated_at of the wrong type: {data.get('reason')!r}, "
                             f"{data.get('updated_at')!r}")
        for name in ("last_kept", "pending"):
            if data.get(name) is not None and not isinstance(data[name], str):
                raise ValueError(f"pointer {name} {data[name]!r} is not a version name")
        for name in ("probation", "last_probation"):
            if data.get(name) is not None:
                from loraloop.registry.probation import Probation

                Probation.from_dict(data[name])  # refuses a damaged probation with its reason
        data["history"] = tuple(history)
        return cls(**data)

    def current_probation(self):
        """The undecided :class:`~loraloop.registry.probation.Probation` (None without one); it may be past its limit."""
        from loraloop.registry.probation import Probation

        return Probation.from_dict(self.probation) if self.probation else None


Mutation = Callable[[ActivePointer], ActivePointer]


class PointerStore(abc.ABC):
    @abc.abstractmethod
    def read(self) -> ActivePointer: ...

    @abc.abstractmethod
    def update(self, mutate: Mutation) -> ActivePointer:
        """Apply ``mutate`` atomically with respect to every other writer; return the new pointer."""

    def wait_for_change(self, generation: int, timeout: float, poll_s: float) -> ActivePointer:
        """The pointer as soon as its generation differs from ``generation`` (or at timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            pointer = self.read()
            remaining = deadline - time.monotonic()
            if pointer.generation != generation or remaining <= 0:
                return pointer
            time.sleep(min(poll_s, remaining))


@dataclass
class MemoryPointerStore(PointerStore):
    _pointer: ActivePointer = field(default_factory=ActivePointer)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def read(self) -> ActivePointer:
        with self._cond:
            return self._pointer

    def update(self, mutate: Mutation) -> ActivePointer:
        with self._cond:
            self._pointer = mutate(self._pointer)
            self._cond.notify_all()
            return self._pointer

    def wait_for_change(self, generation: int, timeout: float, poll_s: float) -> ActivePointer:
        with self._cond:
            self._cond.wait_for(lambda: self._pointer.generation != generation, timeout)
            return self._pointer


class FilePointerStore(PointerStore):
    """``<root>/pointer.json``, replaced atomically; writers serialized by a lock.

    On a local filesystem the lock is ``fcntl.flock`` on ``pointer.lock`` (safe across
    processes). On other fsspec filesystems it is a process-local lock only, unless
    :class:`RedisPointerStore` wraps this store (it adds a Redis lock): otherwise run one
    promoting process (the learner) per object-store registry.
    """

    _local_locks: dict[str, threading.Lock] = {}

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str) -> None:
        self.fs = fs
        self.path = f"{root}/pointer.json"
        self.last_good = self.path + LAST_GOOD_SUFFIX
        self.local = _is_local(fs)
        self._thread_lock = self._local_locks.setdefault(self.path, threading.Lock())
        self._reported: str | None = None  # digest of the damaged file last logged, so it is logged once

    def _cat(self, path: str) -> bytes | None:
        try:
            data = self.fs.cat_file(path)  # see store._read
        except FileNotFoundError:
            return None
        if len(data) > MAX_POINTER_BYTES:
            raise ValueError(f"{len(data)} bytes, over the {MAX_POINTER_BYTES}-byte limit")
        return data

    def read(self) -> ActivePointer:
        """The pointer in ``pointer.json``, or in its last good copy when the file is damaged or missing.

        Raises:
            RegistryError: both the file and its last good copy are damaged.
        """
        try:
            raw = self._cat(self.path)
            if raw is not None:
                return ActivePointer.from_json(raw)
            problem, digest = "missing", "missing"
        except (ValueError, UnicodeDecodeError) as e:
            problem, digest = f"damaged ({e})", hashlib.sha256(str(e).encode()).hexdigest()
        try:
            backup = self._cat(self.last_good)
            pointer = ActivePointer.from_json(backup) if backup is not None else None
        except (ValueError, UnicodeDecodeError) as e:
            raise RegistryError(f"{self.path} is {problem} and its last good copy {self.last_good} is damaged "
                                f"too ({e}); restore one of them (or delete both to start an empty history)") from e
        if pointer is None:
            return ActivePointer()  # a new registry: neither file written yet
        if self._reported != digest:
            self._reported = digest
            logger.error("REGISTRY POINTER %s is %s: using its last good copy %s (active %s, generation %d); "
                         "the next promote or rollback rewrites it", self.path, problem, self.last_good,
                         pointer.version, pointer.generation)
        return pointer

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock:
            if not self.local:
                yield
                return
            import fcntl

            with open(self.path + ".lock", "a+") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)

    def update(self, mutate: Mutation) -> ActivePointer:
        with self._locked():
            pointer = mutate(self.read())
            data = pointer.to_json().encode()
            write_atomic(self.fs, self.path, data)
            write_atomic(self.fs, self.last_good, data)  # after the file: a crash between leaves it one behind
            self._reported = None
            return pointer


class RedisPointerStore(PointerStore):
    """``pointer.json`` as the truth, plus a Redis copy under ``key`` and a message on ``<key>:changes``.

    Args:
        file: the file store that holds the truth.
        client: a redis-py client.
        key: the Redis key of the copy (see ``loraloop.registry.pointer_key``).
        lock_timeout_s: on an object-store registry, how long a writer may hold the Redis lock
            that serializes updates across hosts.
    """

    def __init__(self, file: FilePointerStore, client: object, key: str, *, lock_timeout_s: float = 30.0) -> None:
        self.file = file
        self.client = client
        self.key = key
        self.channel = f"{key}:changes"
        self.lock_timeout_s = lock_timeout_s
        self._warned: str | None = None  # last disagreeing copy logged

    def read(self) -> ActivePointer:
        return self.file.read()

    @contextlib.contextmanager
    def _cross_host_lock(self) -> Iterator[None]:
        if self.file.local:  # flock already serializes every process on this filesystem
            yield
            return
        import redis

        lock = self.client.lock(f"{self.key}:lock", timeout=self.lock_timeout_s,
                                blocking_timeout=self.lock_timeout_s)
        try:
            acquired = lock.acquire()
        except redis.RedisError as e:
            raise RegistryError(f"cannot lock the pointer {self.file.path} through Redis ({e}); refusing to change "
                                f"an object-store pointer without a cross-host lock") from e
        if not acquired:
            raise RegistryError(f"pointer lock {self.key}:lock still held after {self.lock_timeout_s:g} s")
        try:
            yield
        finally:
            with contextlib.suppress(redis.RedisError):
                lock.release()

    def update(self, mutate: Mutation) -> ActivePointer:
        with self._cross_host_lock():
            pointer = self.file.update(mutate)
        self._mirror(pointer, notify=True)
        return pointer

    def _mirror(self, pointer: ActivePointer, notify: bool) -> None:
        """Write the Redis copy (and notify); a Redis failure only delays watchers to their next poll."""
        import redis

        try:
            with self.client.pipeline(transaction=True) as pipe:
                pipe.set(self.key, pointer.to_json())
                if notify:
                    pipe.publish(self.channel, str(pointer.generation))
                pipe.execute()
        except redis.RedisError as e:
            logger.warning("registry pointer: cannot update its Redis copy %s (%s); pointer.json has generation "
                           "%d and watchers will see it at their next poll", self.key, e, pointer.generation)

    def _repair_copy(self, pointer: ActivePointer) -> None:
        """Refill a missing Redis copy (Redis lost its data) or overwrite one that disagrees with the file."""
        import redis

        try:
            raw = self.client.get(self.key)
        except redis.RedisError:
            return  # Redis down: nothing to repair, watchers poll
        expected = pointer.to_json()
        if raw is not None and raw.decode(errors="replace") == expected:
            return
        if raw is not None and self._warned != raw:
            self._warned = raw
            logger.warning("registry pointer: the Redis copy %s disagrees with %s (Redis has %.200r, the file "
                           "generation %d, active %s); trusting the file and restoring the copy", self.key,
                           self.file.path, raw, pointer.generation, pointer.version)
        self._mirror(pointer, notify=False)

    def adopt_copy(self, check: Callable[[str], None]) -> ActivePointer:
        """Upgrade from a Redis-only pointer: write the Redis copy into a ``pointer.json`` never written before.

        Args:
            check: refuses a version name (the registry's ``verify``), applied to the copy's active version.

        Raises:
            RegistryError: the file already exists (it is the truth), or Redis holds no pointer.
        """
        if self.file.fs.exists(self.file.path) or self.file.fs.exists(self.file.last_good):
            raise RegistryError(f"{self.file.path} already exists and is the source of truth; nothing to adopt")
        raw = self.client.get(self.key)
        if raw is None:
            raise RegistryError(f"Redis holds no pointer under {self.key}; nothing to adopt")
        try:
            copy = ActivePointer.from_json(raw)
        except ValueError as e:
            raise RegistryError(f"the Redis pointer under {self.key} is damaged ({e}); nothing adopted") from e
        if copy.version is not None:
            check(copy.version)

        def adopt(p: ActivePointer) -> ActivePointer:
            if p != ActivePointer():
                raise RegistryError(f"{self.file.path} was written meanwhile (generation {p.generation}); "
                                    f"nothing adopted")
            return copy

        with self._cross_host_lock():
            pointer = self.file.update(adopt)
        logger.warning("registry pointer: adopted the Redis copy %s into %s (active %s, generation %d)", self.key,
                       self.file.path, pointer.version, pointer.generation)
        return pointer

    def wait_for_change(self, generation: int, timeout: float, poll_s: float) -> ActivePointer:
        """Wake on the pub/sub channel (or every ``poll_s``) and re-read the file; poll while Redis is down."""
        import redis

        deadline = time.monotonic() + timeout
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        try:
            try:
                pubsub.subscribe(self.channel)
            except redis.RedisError:
                pubsub.close()
                pubsub = None
            pointer = self.read()  # after subscribing, so no change can slip between
            self._repair_copy(pointer)
            while True:
                remaining = deadline - time.monotonic()
                if pointer.generation != generation or remaining <= 0:
                    return pointer
                if pubsub is None:
                    time.sleep(min(poll_s, remaining))
                else:
                    try:
                        message = pubsub.get_message(timeout=min(poll_s, remaining))
                    except redis.RedisError:
                        pubsub.close()
                        pubsub = None
                        continue
                    if message is not None:
                        pointer = self.read()
                        if pointer.generation == generation:
                            logger.warning("registry pointer: ignoring a change notification on %s (%.100r) that "
                                           "pointer.json does not back (still generation %d)", self.channel,
                                           message.get("data"), generation)
                            self._repair_copy(pointer)
                        continue
                pointer = self.read()
        finally:
            if pubsub is not None:
                with contextlib.suppress(Exception):
                    pubsub.close()


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in {"file", "local"}


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` under a temporary name, fsync (local), then rename over ``path``."""
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    if _is_local(fs):
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)
