"""The learner's intent journal: a killed cycle is completed, never repeated.

A cycle that has decided what to do with a claim writes an **intent** under
``<registry>/intents/<claim id>.json`` before its first effect: the gate's decision, the
cycle record to write, the event ids it trained on and which of them stay out of the
replay reservoir. Then, in order, each step updates the intent once done:

1. **publish** the candidate (its metadata names the claim id), and mark it ``candidate``
   (to be promoted) or ``rejected`` at once, so no undecided version is ever listed ``ok``;
2. **promote** it when the gate said so, but only while the pointer still names the version
   it was compared with (otherwise it is marked ``superseded``), then mark it ``promoted``;
3. **record** the cycle outcome (``cycles/``, carrying the claim id);
4. **acknowledge** the claim in the buffer, and delete the intent.

:func:`roll_forward` runs steps 1-3, skipping those already done, so the learner that
wrote the intent and one that finds it after a crash run the same code. After a crash a
step may have happened without its intent update; it is found instead of repeated: the
version by the claim id in its metadata, the promotion in the pointer (active, or on its
history), the record by its claim id.

The buffer hands an unacknowledged claim out again after ``claim_idle_s``, under a new
claim id but with the same examples. The learner acknowledges examples that an intent
names with that intent's reservoir decision and does not train on them again (see
``learner.cycle``). An intent whose examples never come back (the buffer acknowledged them
just before the crash, or dropped them) is closed once a claim that would have held them
did not: see :func:`stale`.

One learner per registry: intents are rolled forward by whichever learner finds them.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from loraloop.registry import AdapterRegistry, RegistryError
from loraloop.registry.pointer import write_atomic

logger = logging.getLogger(__name__)

INTENTS_FOLDER = "intents"
MAX_INTENT_BYTES = 64 << 20  # 5,000 event ids and a cycle record are well under a megabyte
FAULT_ENV = "LORALOOP_LEARNER_KILL_AT"  # tests: SIGKILL the learner right after this step
STEPS = ("publish", "promote", "record", "acknowledge")
_CLAIM_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")

Step = Callable[[str], None]
Count = Callable[[str], None]


class Abandoned(RuntimeError):
    """Nothing was published for an intent and nothing can be: its examples are trained again."""


class Intent(BaseModel):
    """What one cycle decided for one claim, and which of its effects are done."""

    model_config = ConfigDict(extra="ignore")

    claim_id: str
    owner: str = ""
    claimed_at: float
    created_at: float
    updated_at: float = 0.0
    event_ids: list[str] = Field(description="examples the cycle trained on (or screened): never trained again")
    screened: list[str] = Field(default_factory=list, description="of event_ids: set aside by the screen")
    suspect: bool = Field(False, description="the gate found the claim's feedback suspect: none is remembered")
    outcome: dict = Field(description="the cycle record to write")
    publish: bool = False
    promote: bool = False
    parent: str | None = None
    metadata: dict = Field(default_factory=dict, description="the candidate's publish metadata")
    candidate_dir: str | None = None
    version: str | None = None
    promoted: bool = False  # the promote step is done (promoted, superseded or refused)
    recorded: bool = False
    acknowledged: list[str] = Field(default_factory=list)

    @field_validator("claim_id")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not _CLAIM_ID.match(value):
            raise ValueError(f"claim id {value!r} is not a safe file name")
        return value

    def quarantined(self, event_ids: set[str] | None = None) -> tuple[set[str], set[str]]:
        """Of ``event_ids`` (default: all), those kept out of the reservoir: (by the screen, by the gate)."""
        ids = set(self.event_ids) if event_ids is None else event_ids & set(self.event_ids)
        screened = ids & set(self.screened)
        return screened, (ids - screened) if self.suspect else set()

    def remaining(self) -> set[str]:
        """Event ids not yet acknowledged."""
        return set(self.event_ids) - set(self.acknowledged)


class Journal:
    """Intent records under ``<registry root>/intents``, each replaced atomically."""

    def __init__(self, registry: AdapterRegistry) -> None:
        self.fs = registry.fs
        self.folder = f"{registry.root.rstrip('/')}/{INTENTS_FOLDER}"

    def _path(self, claim_id: str) -> str:
        return f"{self.folder}/{claim_id}.json"

    def save(self, intent: Intent) -> None:
        intent.updated_at = time.time()
        self.fs.makedirs(self.folder, exist_ok=True)
        write_atomic(self.fs, self._path(intent.claim_id), intent.model_dump_json().encode())

    def load(self, count: Count | None = None) -> list[Intent]:
        """Every open intent, oldest first; an unreadable one is moved aside (``.unreadable``) and logged."""
        if not self.fs.exists(self.folder):
            return []
        intents = []
        for path in sorted(p for p in self.fs.ls(self.folder, detail=False) if str(p).endswith(".json")):
            try:
                if self.fs.size(path) > MAX_INTENT_BYTES:
                    raise ValueError(f"{self.fs.size(path)} bytes, over {MAX_INTENT_BYTES}")
                intents.append(Intent.model_validate_json(self.fs.cat_file(path)))
            except FileNotFoundError:
                continue  # closed meanwhile
            except (ValidationError, ValueError, OSError) as e:
                # Its examples, when they come back, are trained again: the one thing left to do.
                logger.error("unreadable learner intent %s, moved aside: %s", path, e)
                try:
                    self.fs.mv(path, f"{path}.unreadable")
                except OSError as moved:  # left in place: refused again (and logged) at the next load
                    logger.error("cannot move aside %s: %s", path, moved)
                if count:
                    count("unreadable")
        return sorted(intents, key=lambda i: i.created_at)

    def close(self, claim_id: str) -> None:
        try:
            self.fs.rm(self._path(claim_id))
        except FileNotFoundError:
            pass


def roll_forward(intent: Intent, registry: AdapterRegistry, journal: Journal, *, recovering: bool,
                 step: Step, count: Count, by: str = "") -> Intent:
    """Complete the registry steps of ``intent`` (publish, promote, record), skipping those done.

    Args:
        intent: updated in place and saved after each step.
        recovering: the intent was found, not just written by this learner: a step may have
            happened without its update, so the registry is searched before anything is repeated.
        step: called after each registry effect with its name (a fault-injection point).
        count: called with each recovery action (``published``, ``promoted``, ``superseded``, ...).
        by: the learner rolling it forward, for the record.

    Raises:
        Abandoned: nothing was published and the candidate is gone or refused; the caller closes
            the intent and the claim's examples are trained again.
    """
    out = intent.outcome
    if intent.publish and intent.version is None:
        _publish(intent, registry, recovering, step, count)
        journal.save(intent)
        if intent.candidate_dir:
            shutil.rmtree(intent.candidate_dir, ignore_errors=True)
    if intent.publish and not intent.promoted:
        if intent.promote:
            _promote(intent, registry, step, count, recovering)
        intent.promoted = True
        journal.save(intent)
    if not intent.recorded:
        if recovering:
            out["recovered_by"] = by
        else:  # the cycle's time up to its record (set before it is written, not after)
            out["duration_s"] = round(time.time() - float(out.get("started_at") or time.time()), 3)
        if not (recovering and _recorded(registry, intent.claim_id)):
            registry.record_cycle(out)
            if recovering:
                count("recorded")
            step("record")
        intent.recorded = True
        journal.save(intent)
    return intent


def _publish(intent: Intent, registry: AdapterRegistry, recovering: bool, step: Step, count: Count) -> None:
    out = intent.outcome
    version = _published(registry, intent.claim_id) if recovering else None
    if version is None:
        folder = intent.candidate_dir
        if not folder or not Path(folder).is_dir():
            raise Abandoned(f"claim {intent.claim_id}: candidate folder {folder!r} is gone and nothing was "
                            f"published")
        try:
            version = registry.publish(folder, parent=intent.parent,
                                       metadata={**intent.metadata, "claim_id": intent.claim_id})
        except RegistryError as e:  # refused content: retrying the same folder cannot succeed
            shutil.rmtree(folder, ignore_errors=True)
            raise Abandoned(f"claim {intent.claim_id}: the registry refused the candidate: {e}") from e
        if recovering:
            count("published")
        step("publish")
    intent.version = version
    out.update(version=version, parent=intent.parent)
    evidence = {"claim_id": intent.claim_id, "gate": out.get("reason", ""), **(out.get("candidate") or {})}
    registry.set_status(version, "candidate" if intent.promote else "rejected", evidence)


def _promote(intent: Intent, registry: AdapterRegistry, step: Step, count: Count, recovering: bool) -> None:
    out, version = intent.outcome, intent.version
    assert version is not None
    pointer = registry.active()
    evidence = {"claim_id": intent.claim_id, "gate": out.get("reason", "")}
    if pointer.version == version or version in pointer.history:
        pass  # promoted before the crash (and maybe rolled back since): the promotion stands
    elif pointer.version != intent.parent:
        # The gate compared the candidate with the parent; promoting it now would undo whatever
        # moved the pointer (a rollback, a manual promote).
        out["outcome"] = "superseded"
        out["reason"] = (f"not promoted: the active version moved from {intent.parent} to {pointer.version} "
                         f"before {version} was promoted ({out.get('reason', '')})")
        registry.set_status(version, "superseded", {**evidence, "active": pointer.version})
        count("superseded")
        logger.warning("candidate %s superseded: %s", version, out["reason"])
        return
    else:
        try:
            registry.promote(version, reason=f"learner ({out.get('trigger', '')}): {out.get('reason', '')}")
        except RegistryError as e:
            out["outcome"], out["reason"] = "failed", f"promote refused: {e}"
            registry.set_status(version, "refused", {**evidence, "error": str(e)})
            logger.error("candidate %s passed the gate but the registry refused to promote it: %s", version, e)
            return
        if recovering:
            count("promoted")
        step("promote")
    registry.set_status(version, "promoted", evidence)


def _published(registry: AdapterRegistry, claim_id: str) -> str | None:
    """The version published for ``claim_id``, if any (newest first: it is one of the last)."""
    for info in reversed(registry.versions()):
        if info.metadata.get("claim_id") == claim_id:
            return info.version
    return None


def _recorded(registry: AdapterRegistry, claim_id: str) -> bool:
    return any(c.get("claim_id") == claim_id for c in registry.cycles())


def stale(intent: Intent, now: float, claim_idle_s: float) -> bool:
    """Whether a claim made at ``now`` that was not full would have held the intent's examples.

    The buffer hands expired claims out first, ``claim_idle_s`` after they were claimed;
    a second ``claim_idle_s`` covers clock skew between the learner and the store.
    """
    return intent.recorded and now >= intent.claimed_at + 2 * claim_idle_s


def fault_point_from_env() -> Step:
    """The step hook: SIGKILL this process right after the step named by ``LORALOOP_LEARNER_KILL_AT``.

    For crash tests only; the variable is unset in any real deployment, and then this is a no-op.
    """
    at = os.environ.get(FAULT_ENV, "")
    if not at:
        return _no_fault
    if at not in STEPS:
        raise ValueError(f"{FAULT_ENV}={at!r}: expected one of {STEPS}")

    def kill(step: str) -> None:
        if step == at:
            logger.critical("%s=%s: killing the learner after %s", FAULT_ENV, at, step)
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)

    return kill


def _no_fault(step: str) -> None:
    return None
