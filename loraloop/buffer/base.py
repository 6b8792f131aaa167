"""The feedback boundary: the request log (what was served) and the feedback buffer.

Both have a Redis and an in-memory implementation, held to one contract suite.
"""

from __future__ import annotations

import abc
from collections.abc import Collection
from dataclasses import dataclass, field

from loraloop.schemas import Example, ServedRequest


class BufferError(RuntimeError):  # noqa: A001 - a loraloop error, not the builtin
    """The backing store could not be reached."""


@dataclass(frozen=True)
class Durability:
    """How an acknowledged append survives a restart of the store.

    ``durable`` is True when an append the buffer acknowledged survives the store's
    process being killed; ``mode`` says how it is confirmed (``memory``: in process, lost
    only with the offsets that live in the same process; ``waitaof``: Redis >= 7.2
    confirms each append is fsynced; ``aof_always``: every write is fsynced before its
    reply; ``aof_everysec``: written to the append-only file before the reply, fsynced
    within a second; ``replica``: WAIT confirms a replica has it; ``none``: lost in a
    restart).
    """

    mode: str
    durable: bool
    detail: str = ""


class RequestLog(abc.ABC):
    """Served requests by id, kept ``ttl_s`` seconds, for feedback to join against."""

    @abc.abstractmethod
    def record(self, served: list[ServedRequest]) -> None:
        """Remember a batch of served requests (raises BufferError when the store is down)."""

    @abc.abstractmethod
    def get(self, request_id: str) -> ServedRequest | None:
        """The served request, or None when unknown or expired."""

    def started_at(self) -> float | None:
        """Unix time the backing store last started (None: unknown, or it lives in this process).

        Entries written before a restart of a store without persistence, or while it was down,
        are missing: feedback on them is retried longer (see ``feedback_store_retry_s``).
        """
        return None

    def get_many(self, request_ids: list[str]) -> dict[str, ServedRequest]:
        """The known ones among ``request_ids`` (backends override this with one round trip)."""
        found = {i: self.get(i) for i in dict.fromkeys(request_ids)}
        return {i: s for i, s in found.items() if s is not None}


@dataclass(frozen=True)
class Claim:
    """A batch handed to one learner; it comes back unless acknowledged."""

    claim_id: str
    examples: list[Example] = field(default_factory=list)
    ids: tuple[str, ...] = ()  # backend ids of the claimed entries


class FeedbackBuffer(abc.ABC):
    """Bounded, deduplicated buffer of joined examples, with a replay reservoir.

    ``append`` -> ``claim`` -> ``acknowledge``. A claim not acknowledged within
    ``claim_idle_s`` (a learner killed mid-cycle) is handed out again by ``claim``.
    Acknowledged examples feed the per-label replay reservoir.
    """

    @abc.abstractmethod
    def append(self, example: Example) -> str:
        """Add one example. Returns 'appended', 'duplicate' (event id seen) or 'full' (trim policy reject)."""

    def append_many(self, examples: list[Example]) -> list[str]:
        """``append`` for each example, in order (backends override this with one round trip)."""
        return [self.append(e) for e in examples]

    @abc.abstractmethod
    def claim(self, consumer: str, max_items: int) -> Claim:
        """Up to ``max_items`` unacknowledged examples (expired claims first)."""

    @abc.abstractmethod
    def acknowledge(self, claim: Claim, remember: bool = True, quarantine: Collection[str] = (),
                    release: Collection[str] = ()) -> None:
        """The cycle that used ``claim`` recorded its outcome: drop it, keep a replay sample.

        ``remember=False`` quarantines the claim: dropped without entering the replay
        reservoir (its candidate lost on data outside the claim, so the feedback is suspect).
        ``quarantine`` names event ids to drop that way while the rest of the claim is
        remembered (examples the learner's screen found suspect). ``release`` names event ids
        the cycle did not use (over their source's cap): they are not acknowledged but put back,
        unclaimed, atomically with the acknowledgement of the rest, for a later claim; nothing of
        them is remembered. A claim acknowledged already (or handed out again) releases nothing.
        """

    @abc.abstractmethod
    def depth(self) -> int:
        """Examples not yet acknowledged (claimed or not)."""

    @abc.abstractmethod
    def pending(self) -> int:
        """Examples not yet claimed."""

    @abc.abstractmethod
    def remember(self, examples: list[Example]) -> None:
        """Put examples straight into the replay reservoir (the bootstrap training set)."""

    @abc.abstractmethod
    def replay_sample(self, n: int, seed: int) -> list[Example]:
        """A per-label balanced sample of past (acknowledged) examples."""

    def take_dropped(self) -> dict[str, int]:
        """Examples dropped since the last call, by reason, and reset the tally.

        Reasons: ``drop_oldest`` (``buffer_trim=drop_oldest`` made room), ``retention``
        (unacknowledged entries older than ``request_text_retention_s``), ``replay_retention``
        (replay reservoir entries older than it).
        """
        return {}

    def durability(self) -> Durability:
        """How appends survive a restart of the store (raises BufferError when the store is down)."""
        return Durability("memory", True, "in process: lost only together with the offsets of the same process")

    def instance_id(self) -> str | None:
        """An id that changes when the store restarts (None: it lives in this process)."""
        return None
