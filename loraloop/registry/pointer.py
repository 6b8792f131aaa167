"""Where the active adapter version and its history live: one durable place per registry.

Three stores behind one interface: a JSON file replaced atomically (local folder or
any fsspec URL), a Redis key (with a pub/sub notification on every change), and
memory (tests, ``memory://`` registries). ``update`` is a compare-and-swap loop, so
two processes promoting at once never lose an update.
"""

from __future__ import annotations

import abc
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import fsspec

logger = logging.getLogger(__name__)

HISTORY_LIMIT = 50


@dataclass(frozen=True)
class ActivePointer:
    """The active version, a generation that grows on every change, and earlier actives."""

    version: str | None = None
    generation: int = 0
    history: tuple[str, ...] = ()
    reason: str = ""
    updated_at: float = 0.0
    sequence: int = 0  # last version number handed out, so ids are never reused

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes | None) -> ActivePointer:
        if not raw:
            return cls()
        data = json.loads(raw)
        data["history"] = tuple(data.get("history", ()))
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


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
    processes). On other fsspec filesystems it is a process-local lock only: run one
    promoting process (the learner) per object-store registry, or use the Redis pointer.
    """

    _local_locks: dict[str, threading.Lock] = {}

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str) -> None:
        self.fs = fs
        self.path = f"{root}/pointer.json"
        self._local = _is_local(fs)
        self._thread_lock = self._local_locks.setdefault(self.path, threading.Lock())

    def read(self) -> ActivePointer:
        try:
            return ActivePointer.from_json(self.fs.cat_file(self.path))  # see store._read
        except FileNotFoundError:
            return ActivePointer()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock:
            if not self._local:
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
            write_atomic(self.fs, self.path, pointer.to_json().encode())
            return pointer


class RedisPointerStore(PointerStore):
    """One Redis key holding the pointer JSON; every change is published on ``<key>:changes``."""

    def __init__(self, client: object, key: str) -> None:
        self.client = client
        self.key = key
        self.channel = f"{key}:changes"

    def read(self) -> ActivePointer:
        return ActivePointer.from_json(self.client.get(self.key))

    def update(self, mutate: Mutation) -> ActivePointer:
        import redis

        while True:
            with self.client.pipeline() as pipe:
                try:
                    pipe.watch(self.key)
                    pointer = mutate(ActivePointer.from_json(pipe.get(self.key)))
                    pipe.multi()
                    pipe.set(self.key, pointer.to_json())
                    pipe.publish(self.channel, str(pointer.generation))
                    pipe.execute()
                    return pointer
                except redis.WatchError:
                    continue  # another writer won the race: re-read and re-apply

    def wait_for_change(self, generation: int, timeout: float, poll_s: float) -> ActivePointer:
        """Block on the pub/sub channel; re-read every ``poll_s`` in case a message was missed."""
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(self.channel)
            deadline = time.monotonic() + timeout
            while True:
                pointer = self.read()  # after subscribing, so no change can slip between
                remaining = deadline - time.monotonic()
                if pointer.generation != generation or remaining <= 0:
                    return pointer
                pubsub.get_message(timeout=min(poll_s, remaining))
        finally:
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
