"""The versioned adapter registry on a local folder or any fsspec URL.

Layout under the root::

    versions/<version>/           adapter_model.safetensors, adapter_config.json, labels.json, metadata.json,
                                  signature (when a signing key is set), _COMPLETE
    status/<version>.json         mutable annotations (rejected, with evidence)
    cycles/<time>-<id>.json       one outcome per learner cycle
    pointer.json                  active version + history + probation state (and pointer.json.last-good)
    probation.json                the guard's progress on the open probation (informational)
    probations/<time>-<id>.json   one record per ended probation: decision, evidence, who decided

A version folder is immutable once published: it is written under a temporary name
and renamed (local) or completed by a ``_COMPLETE`` marker written last (object
stores), so a half-written version is never listed. Version ids carry a sequence
number handed out by the pointer store and a random suffix: never reused.

``publish``, ``promote``, ``verify`` and ``fetch`` run the same checks: regular files
only (inspected before they are opened), size bounds, sha256 of every file against
``metadata.json``, the Ed25519 signature of ``metadata.json`` when a key is configured,
and the adapter's content (a real safetensors file of finite tensors, a LoRA config,
a label map that fits the head).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import fsspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from loraloop.model import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LABELS_FILE, METADATA_FILE
from loraloop.redact import mask_url
from loraloop.registry.checks import (
    check_adapter,
    check_local_entries,
    check_remote_entries,
    read_regular_file,
)
from loraloop.registry.errors import VERSION_PATTERN, RegistryError, check_version_name
from loraloop.registry.pointer import HISTORY_LIMIT, ActivePointer, PointerStore, _is_local, write_atomic
from loraloop.registry.probation import (
    INSUFFICIENT,
    KEEP,
    MANUAL,
    ROLLBACK,
    SUPERSEDED,
    Probation,
    ProbationTerms,
    paired_of,
)
from loraloop.registry.signing import SIGNATURE_FILE, key_id, sign_manifest, verify_manifest

logger = logging.getLogger(__name__)

REQUIRED_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG, LABELS_FILE)
COMPLETE_MARKER = "_COMPLETE"
BOOKKEEPING_FILES = (METADATA_FILE, COMPLETE_MARKER, SIGNATURE_FILE)
# Formats that can run code when loaded: never stored, never served.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
_SEQUENCE = re.compile(r"v(\d{6})-")

__all__ = ["AdapterRegistry", "RegistryError", "VersionInfo", "check_version_name", "VERSION_PATTERN"]


@dataclass(frozen=True)
class VersionInfo:
    version: str
    parent: str | None
    created_at: float
    metadata: dict = field(default_factory=dict)
    status: dict = field(default_factory=dict)


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _refuse_pickles(names: list[str], where: str) -> None:
    bad = [n for n in names if n.lower().endswith(PICKLE_SUFFIXES)]
    if bad:
        raise RegistryError(f"{where}: refusing pickled weight file(s) {bad}; adapters must be safetensors")


class AdapterRegistry:
    """Versions of LoRA adapters and the pointer to the active one.

    Args:
        url: local folder or fsspec URL of the registry root.
        pointer: where the active pointer lives.
        poll_s: fallback polling period of :meth:`wait_for_change`.
        signing_key: signs every published version (``signature`` file).
        verify_key: versions not signed by it are refused by every check; defaults to the
            signing key's public half, and to no signature check when neither is given.
        label_capacity: the head's slots; a label map longer than this is refused.
        probation: the terms a promotion over another version is judged on (None: promotions are
            final at once, nothing is put on probation).
    """

    def __init__(self, url: str, pointer: PointerStore, poll_s: float = 0.5, *,
                 signing_key: Ed25519PrivateKey | None = None, verify_key: Ed25519PublicKey | None = None,
                 label_capacity: int | None = None, probation: ProbationTerms | None = None) -> None:
        self.probation_terms = probation
        self.fs, root = fsspec.core.url_to_fs(url)
        self.root = root.rstrip("/") or "/"
        self.url = url
        self.pointer = pointer
        self.poll_s = poll_s
        self.signing_key = signing_key
        self.verify_key = verify_key if verify_key is not None else (
            signing_key.public_key() if signing_key is not None else None)
        self.label_capacity = label_capacity
        self._local = _is_local(self.fs)
        self.fs.makedirs(f"{self.root}/versions", exist_ok=True)
        if signing_key is not None and verify_key is not None and key_id(signing_key.public_key()) != key_id(verify_key):
            raise RegistryError(f"registry_signing_key (key {key_id(signing_key.public_key())!r}) does not match "
                                f"registry_verify_key (key {key_id(verify_key)!r}): this process could not read "
                                f"what it publishes")

    # --- paths -------------------------------------------------------------------------
    def _dir(self, version: str) -> str:
        return f"{self.root}/versions/{check_version_name(version)}"

    def _read_bytes(self, path: str, where: str) -> bytes:
        """A file of the registry: local ones never through a link or a FIFO, always within size bounds."""
        if self._local:
            return read_regular_file(path, where)
        return _read(self.fs, path)

    def _read_json(self, path: str) -> dict:
        return json.loads(self._read_bytes(path, mask_url(self.url)))

    # --- publishing ----------------------------------------------------------------------
    def publish(self, src_dir: str | Path, *, parent: str | None = None, metadata: dict | None = None,
                pending: bool = False) -> str:
        """Check an adapter folder and copy it in as a new immutable (and signed) version; return its id.

        With ``pending`` the version is also held as the pending candidate (:meth:`hold`).

        Raises:
            RegistryError: a required file is missing or is not a regular file, a pickled file is
                present, the parent is unknown, or the adapter fails a check (weights not a
                safetensors file or not finite, a label map over ``label_capacity``, not a LoRA config).
        """
        src = Path(src_dir)
        names = sorted(os.listdir(src)) if src.is_dir() else []
        _refuse_pickles(names, str(src))
        missing = [n for n in REQUIRED_FILES if n not in names]
        if missing:
            raise RegistryError(f"{src}: not an adapter folder, missing {missing}")
        check_local_entries(str(src), list(REQUIRED_FILES), str(src))  # lstat first: a FIFO is never opened
        blobs = {n: read_regular_file(str(src / n), str(src)) for n in REQUIRED_FILES}
        check_adapter(blobs, str(src), self.label_capacity)
        if parent is not None:
            self.show(parent)
        version = self._new_version_id()
        meta = dict(metadata or {})
        meta.update(version=version, parent=parent, created_at=time.time(),
                    files={n: sha256_of(b) for n, b in blobs.items()})
        blobs[METADATA_FILE] = json.dumps(meta, indent=1, sort_keys=True, default=str).encode()
        if self.signing_key is not None:
            blobs[SIGNATURE_FILE] = sign_manifest(self.signing_key, blobs[METADATA_FILE])
        self._write_version(version, blobs)
        logger.info("published adapter version %s (parent %s, %s) in %s", version, parent,
                    "signed" if self.signing_key is not None else "unsigned", mask_url(self.url))
        if pending:
            self.hold(version)
        return version

    def _new_version_id(self) -> str:
        # The floor from the folder keeps ids increasing even if the pointer was reset or restored.
        floor = max((int(m.group(1)) for m in map(_SEQUENCE.search, self._listing()) if m), default=0)
        pointer = self.pointer.update(lambda p: replace(p, sequence=max(p.sequence, floor) + 1))
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        return f"v{pointer.sequence:06d}-{stamp}-{secrets.token_hex(3)}"

    def _listing(self) -> list[str]:
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(f"{self.root}/versions", detail=False)]

    def _write_version(self, version: str, blobs: dict[str, bytes]) -> None:
        final = self._dir(version)
        if self.fs.exists(final):
            raise RegistryError(f"version {version} already exists; version ids are never reused")
        if self._local:
            tmp = f"{self.root}/versions/.tmp-{version}"
            os.makedirs(tmp)
            try:
                for name, data in {**blobs, COMPLETE_MARKER: b""}.items():
                    with open(f"{tmp}/{name}", "wb") as f:
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
                os.rename(tmp, final)
                _fsync_dir(f"{self.root}/versions")
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            return
        for name, data in blobs.items():
            with self.fs.open(f"{final}/{name}", "wb") as f:
                f.write(data)
        with self.fs.open(f"{final}/{COMPLETE_MARKER}", "wb") as f:  # last: only now is it listed
            f.write(b"")

    def sign(self, version: str) -> None:
        """Sign an existing version (one published before a key was set), after checking it.

        Raises:
            RegistryError: no signing key, or the version fails a check.
        """
        if self.signing_key is None:
            raise RegistryError("no registry_signing_key configured: nothing to sign with")
        blobs = self._read_version(version)
        self._check_version(version, blobs, require_signature=False)
        write_atomic(self.fs, f"{self._dir(version)}/{SIGNATURE_FILE}",
                     sign_manifest(self.signing_key, blobs[METADATA_FILE]))
        logger.info("signed adapter version %s with key %s", version, key_id(self.signing_key.public_key()))

    # --- reading -------------------------------------------------------------------------
    def versions(self) -> list[VersionInfo]:
        """Every complete version, oldest first."""
        out = []
        for name in self._listing():
            if VERSION_PATTERN.match(name) and self.fs.exists(f"{self.root}/versions/{name}/{COMPLETE_MARKER}"):
                out.append(self.show(name))
        return sorted(out, key=lambda v: v.version)

    def show(self, version: str) -> VersionInfo:
        """A version's metadata and status, as written (not verified: see :meth:`verify`)."""
        folder = self._dir(version)
        if not self.fs.exists(f"{folder}/{COMPLETE_MARKER}"):
            raise RegistryError(f"unknown adapter version {version!r}")
        try:
            meta = self._read_json(f"{folder}/{METADATA_FILE}")
        except ValueError as e:  # RegistryError included
            raise RegistryError(f"version {version}: unreadable {METADATA_FILE}: {e}") from e
        status_path = f"{self.root}/status/{version}.json"
        status = self._read_json(status_path) if self.fs.exists(status_path) else {}
        return VersionInfo(version, meta.get("parent"), float(meta.get("created_at", 0)), meta, status)

    def verify(self, version: str) -> None:
        """Refuse a version that any check fails (see the module docstring); never blocks on a FIFO.

        Raises:
            RegistryError: unknown, or the first failing check with its reason.
        """
        self._check_version(version, self._read_version(version))

    def _read_version(self, version: str) -> dict[str, bytes]:
        """Every file of a version folder, each checked to be a regular file within bounds before it is read."""
        folder = self._dir(version)
        self.show(version)
        where = f"version {version}"
        if self._local:
            names = sorted(os.listdir(folder))
            check_local_entries(folder, names, where)
            return {n: read_regular_file(f"{folder}/{n}", where) for n in names}
        return {n: _read(self.fs, f"{folder}/{n}") for n in check_remote_entries(self.fs, folder, where)}

    def _check_version(self, version: str, blobs: dict[str, bytes], *, require_signature: bool = True) -> dict:
        """The version's metadata once its signature, checksums and content passed; refuse otherwise."""
        where = f"version {version}"
        manifest = blobs.get(METADATA_FILE)
        if manifest is None:
            raise RegistryError(f"{where}: missing {METADATA_FILE}")
        if self.verify_key is not None and require_signature:
            verify_manifest(self.verify_key, manifest, blobs.get(SIGNATURE_FILE), where)
        try:
            meta = json.loads(manifest)
        except ValueError as e:
            raise RegistryError(f"{where}: unreadable {METADATA_FILE}: {e}") from e
        if not isinstance(meta, dict) or meta.get("version") != version:
            raise RegistryError(f"{where}: {METADATA_FILE} names version "
                                f"{meta.get('version') if isinstance(meta, dict) else meta!r}, not {version}")
        _check_files(version, meta, blobs)
        check_adapter(blobs, where, self.label_capacity)
        return meta

    def fetch(self, version: str, dest_dir: str | Path) -> Path:
        """A verified local copy of ``version`` in ``dest_dir/<version>`` (reused when it still verifies).

        Raises:
            RegistryError: the version (or, when no copy can be made, its copy) fails a check.
        """
        blobs = self._read_version(version)
        self._check_version(version, blobs)
        dest = Path(dest_dir) / version
        if dest.is_dir() and not dest.is_symlink():
            try:
                names = sorted(os.listdir(dest))
                check_local_entries(str(dest), names, f"local copy of {version}")
                if {n: read_regular_file(str(dest / n), version) for n in names} == blobs:
                    return dest
            except RegistryError as e:
                logger.warning("local copy %s of %s is damaged (%s): fetching it again", dest, version, e)
            shutil.rmtree(dest)
        tmp = Path(dest_dir) / f".tmp-{version}-{secrets.token_hex(3)}"
        tmp.mkdir(parents=True)
        try:
            for name, data in blobs.items():
                (tmp / name).write_bytes(data)
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest

    # --- the active pointer ------------------------------------------------------------
    def active(self) -> ActivePointer:
        return self.pointer.read()

    def promote(self, version: str, reason: str = "manual", *, probation: bool | None = None) -> ActivePointer:
        """Make ``version`` active (after every check of :meth:`verify`); the current one goes on the history.

        Args:
            version: the version to serve.
            reason: why (recorded in the pointer).
            probation: True or None (the default, when the registry has probation terms) puts a
                promotion over another version on probation for the guard to judge; False makes it
                an operator's choice: final at once, kept (``last_kept``), and any probation in
                progress ends as ``manual``. A promotion on probation ends the one in progress as
                ``superseded`` (or ``insufficient_evidence`` when its limit passed undecided).

        Raises:
            RegistryError: the version fails a check, or ``probation=True`` without probation terms.
        """
        pointer = self._promote(version, reason, probation, None)
        assert pointer is not None  # no precondition: never refused
        return pointer

    def _promote(self, version: str, reason: str, probation: bool | None,
                 precondition: Callable[[ActivePointer], bool] | None) -> ActivePointer | None:
        self.verify(version)
        if probation and self.probation_terms is None:
            raise RegistryError("probation=True but this registry has no probation terms (guard_probation is off)")
        ended: list[Probation] = []
        refused: list[bool] = []

        def mutate(p: ActivePointer) -> ActivePointer:
            ended.clear()
            refused.clear()
            if precondition is not None and not precondition(p):
                refused.append(True)
                return p
            if p.version == version:
                return p
            now = time.time()
            judged = p.version is not None and probation is not False and self.probation_terms is not None
            current = p.current_probation()
            last_probation = p.last_probation
            if current is not None:
                if probation is False:
                    done = current.ended(MANUAL, f"operator promoted {version} ({reason})", {}, by=reason, at=now)
                elif not current.is_open(now):
                    done = current.ended(INSUFFICIENT, "the probation limit passed without a guard decision",
                                         {}, by="registry", at=now)
                else:
                    done = current.ended(SUPERSEDED, f"{version} promoted before a decision ({reason})", {},
                                         by=reason, at=now)
                ended.append(done)
                last_probation = done.to_dict()
            history = (*p.history, p.version) if p.version else p.history
            fields: dict = dict(version=version, generation=p.generation + 1, history=history[-HISTORY_LIMIT:],
                                reason=reason, updated_at=now, probation=None, last_probation=last_probation,
                                pending=None if p.pending == version else p.pending)
            if judged:
                terms = self.probation_terms
                fields["probation"] = Probation(
                    version=version, baseline=p.version, last_kept=p.last_kept or p.version, started_at=now,
                    window_s=terms.window_s, limit_s=terms.limit_s, needed=terms.needed,
                    generation=p.generation + 1, carried=_carry(p)).to_dict()
            else:
                fields["last_kept"] = version  # the first version, or an operator's choice
            return replace(p, **fields)

        pointer = self.pointer.update(mutate)
        if refused:
            return None
        for done in ended:
            self._log_probation(done)
        logger.info("promoted %s (%s) in %s; generation %d%s", version, reason, mask_url(self.url),
                    pointer.generation, " on probation" if pointer.probation else "")
        return pointer

    def rollback(self, reason: str = "manual", to: str | None = None) -> ActivePointer:
        """Go back to the previous active version (or to ``to``); an operator's choice: it becomes ``last_kept``.

        A probation in progress ends as ``manual``. The guard rolls back through :meth:`end_probation`.

        Raises:
            RegistryError: no previous version, or ``to`` is unknown or corrupted.
        """
        if to is not None:
            self.verify(to)
        ended: list[Probation] = []

        def mutate(p: ActivePointer) -> ActivePointer:
            ended.clear()
            history = list(p.history)
            target = to
            if target is None:
                if not history:
                    raise RegistryError(f"no previous version to roll back to (active: {p.version!r}, empty history)")
                target = history.pop()
            elif target in history:
                del history[len(history) - 1 - history[::-1].index(target):]
            current = p.current_probation()
            last_probation = p.last_probation
            if current is not None:
                done = current.ended(MANUAL, f"rolled back to {target} ({reason})", {}, by=reason)
                ended.append(done)
                last_probation = done.to_dict()
            return replace(p, version=target, generation=p.generation + 1, history=tuple(history),
                           reason=f"rollback: {reason}", updated_at=time.time(), probation=None,
                           last_probation=last_probation, last_kept=target)

        if to is None:
            target = self.active().history[-1:] or [None]
            if target[0] is not None:
                self.verify(target[0])
        pointer = self.pointer.update(mutate)
        for done in ended:
            self._log_probation(done)
        logger.warning("rolled back to %s (%s); generation %d", pointer.version, reason, pointer.generation)
        return pointer

    # --- probation ---------------------------------------------------------------------
    def probation(self) -> Probation | None:
        """The probation in progress (undecided; it may be past its limit), or None."""
        return self.active().current_probation()

    def probation_open(self, now: float | None = None) -> bool:
        """Whether a version is on probation now (undecided and within its limit): the learner then holds."""
        current = self.probation()
        return current is not None and current.is_open(now)

    def last_probation(self) -> Probation | None:
        """The newest ended probation, with its decision and evidence."""
        raw = self.active().last_probation
        return Probation.from_dict(raw) if raw else None

    def last_kept(self) -> str | None:
        """The newest version a guard kept or an operator chose: where a guard rollback goes."""
        return self.active().last_kept

    def pending(self) -> str | None:
        """The candidate held until the probation ends (None: none held)."""
        return self.active().pending

    def hold(self, version: str) -> ActivePointer:
        """Hold ``version`` as the pending candidate, replacing (and marking ``superseded``) an older one.

        Raises:
            RegistryError: ``version`` is unknown.
        """
        self.show(version)
        replaced: list[str] = []

        def mutate(p: ActivePointer) -> ActivePointer:
            replaced[:] = [p.pending] if p.pending and p.pending != version else []
            return p if p.pending == version else replace(p, pending=version, generation=p.generation + 1)

        pointer = self.pointer.update(mutate)
        for old in replaced:
            try:
                self.set_status(old, "superseded", {"by": version, "reason": "a newer candidate was held"})
            except RegistryError as e:
                logger.warning("pending %s replaced by %s but not annotated: %s", old, version, e)
        logger.info("holding %s as the pending candidate%s", version, f" (replaces {replaced[0]})" if replaced else "")
        return pointer

    def promote_pending(self, reason: str) -> ActivePointer | None:
        """Promote the pending candidate (on probation) if no probation is open; None when one is or nothing is held.

        The check and the promotion happen in one pointer update: a probation that started
        meanwhile (another learner) wins and nothing is promoted.
        """
        candidate = self.pending()
        if candidate is None or self.probation_open():
            return None
        return self._promote(candidate, reason, None,
                             lambda p: p.pending == candidate and not (p.current_probation() and
                                                                       p.current_probation().is_open()))

    def end_probation(self, version: str, decision: str, evidence: dict, *, generation: int, reason: str = "",
                      by: str = "guard") -> ActivePointer | None:
        """End ``version``'s probation with a guard decision; the single writer's compare-and-set.

        Args:
            version: the version judged.
            decision: ``keep`` (it becomes ``last_kept``), ``rollback`` (the pointer goes back to
                the probation's ``last_kept``) or ``insufficient_evidence`` (it stays, not kept).
            evidence: what the decision rests on (stored in the pointer and the probation log;
                ``evidence["paired"]`` carries into the next probation when not kept).
            generation: the probation's ``generation``: the update is refused if the probation
                in progress is not the one that started at that generation.
            reason: the check that decided (``correctness``...) or ``no_regression``.
            by: who decided (a guard's name).

        Returns:
            The new pointer, or None when the probation was already ended or replaced (another
            guard decided, or a promotion happened): nothing changed.

        Raises:
            RegistryError: ``decision`` is not a guard decision, or the rollback target is corrupted.
        """
        if decision not in (KEEP, ROLLBACK, INSUFFICIENT):
            raise RegistryError(f"end_probation: {decision!r} is not one of keep, rollback, insufficient_evidence")
        target_check = self.probation()
        if decision == ROLLBACK and target_check is not None and target_check.version == version:
            self.verify(target_check.last_kept or target_check.baseline)
        ended: list[Probation] = []

        def mutate(p: ActivePointer) -> ActivePointer:
            ended.clear()
            current = p.current_probation()
            if current is None or current.version != version or current.generation != generation \
                    or p.version != version:
                return p
            done = current.ended(decision, reason, evidence, by=by)
            ended.append(done)
            fields: dict = dict(probation=None, last_probation=done.to_dict(), generation=p.generation + 1)
            if decision == KEEP:
                fields["last_kept"] = version
            elif decision == ROLLBACK:
                target = current.last_kept or current.baseline
                history = list(p.history)
                if target in history:
                    del history[len(history) - 1 - history[::-1].index(target):]
                fields.update(version=target, history=tuple(history), reason=f"rollback: guard: {reason}",
                              updated_at=done.decided_at, last_kept=target)
            return replace(p, **fields)

        pointer = self.pointer.update(mutate)
        if not ended:
            return None
        self._log_probation(ended[0])
        logger.log(logging.WARNING if decision == ROLLBACK else logging.INFO, "probation of %s ended: %s (%s) by %s; "
                   "active %s, generation %d", version, decision, reason, by, pointer.version, pointer.generation)
        return pointer

    def record_progress(self, version: str, progress: dict) -> None:
        """The guard's progress on ``version``'s probation (``probation.json``; informational, last writer wins)."""
        record = {"version": version, "at": time.time(), **progress}
        write_atomic(self.fs, f"{self.root}/probation.json", json.dumps(record, default=str).encode())

    def progress(self) -> dict | None:
        """The guard's last progress record for the probation in progress (None: none, or for another version)."""
        current = self.probation()
        path = f"{self.root}/probation.json"
        if current is None or not self.fs.exists(path):
            return None
        try:
            record = self._read_json(path)
        except ValueError as e:
            logger.warning("unreadable probation progress %s: %s", path, e)
            return None
        return record if isinstance(record, dict) and record.get("version") == current.version else None

    def probations(self) -> list[dict]:
        """Every ended probation, oldest first (decision, evidence, who decided, when)."""
        folder = f"{self.root}/probations"
        if not self.fs.exists(folder):
            return []
        paths = sorted(p for p in self.fs.ls(folder, detail=False) if p.endswith(".json"))
        return [self._read_json(p) for p in paths]

    def _log_probation(self, done: Probation) -> None:
        try:
            self.fs.makedirs(f"{self.root}/probations", exist_ok=True)
            name = f"{time.time_ns():020d}-{secrets.token_hex(3)}.json"
            write_atomic(self.fs, f"{self.root}/probations/{name}", json.dumps(done.to_dict(), default=str).encode())
        except Exception as e:  # the decision stands in pointer.json; the log is best effort
            logger.error("probation of %s ended (%s) but not logged: %s", done.version, done.decision, e)

    def wait_for_change(self, generation: int, timeout: float) -> ActivePointer:
        return self.pointer.wait_for_change(generation, timeout, self.poll_s)

    # --- annotations -------------------------------------------------------------------
    def mark_rejected(self, version: str, evidence: dict) -> None:
        self.set_status(version, "rejected", evidence)

    def set_status(self, version: str, status: str, evidence: dict) -> None:
        """Annotate ``version`` (``candidate``, ``rejected``, ``superseded``...): versions are immutable, status is not."""
        self.show(version)
        self.fs.makedirs(f"{self.root}/status", exist_ok=True)
        record = {"status": status, "evidence": evidence, "at": time.time()}
        write_atomic(self.fs, f"{self.root}/status/{version}.json", json.dumps(record, default=str).encode())

    def record_cycle(self, outcome: dict) -> None:
        self.fs.makedirs(f"{self.root}/cycles", exist_ok=True)
        name = f"{time.time_ns():020d}-{secrets.token_hex(3)}.json"
        write_atomic(self.fs, f"{self.root}/cycles/{name}", json.dumps(outcome, default=str).encode())

    def cycles(self) -> list[dict]:
        folder = f"{self.root}/cycles"
        if not self.fs.exists(folder):
            return []
        paths = sorted(p for p in self.fs.ls(folder, detail=False) if p.endswith(".json"))
        return [self._read_json(p) for p in paths]


def _carry(p: ActivePointer) -> dict:
    """Paired evidence a new probation inherits: the active version's, when its own probation ended unkept.

    A chain of versions that were never kept (``insufficient_evidence``) is judged as one
    against the last kept version: its discordant pairs add up, so small steps down compound
    into evidence instead of into an unnoticed slide.
    """
    last = Probation.from_dict(p.last_probation) if p.last_probation else None
    if last is None or last.version != p.version or last.decision != INSUFFICIENT:
        return {}
    before, own = last.carried_pairs(), paired_of(last.evidence)
    return {"pairs": before["pairs"] + own["pairs"], "new_only": before["new_only"] + own["new_only"],
            "old_only": before["old_only"] + own["old_only"], "versions": [*before["versions"], last.version]}


def _read(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    # cat_file, not open().read(): fsspec's memory filesystem hands every reader the same
    # file object, so two threads reading at once could get each other's position.
    return fs.cat_file(path)


def _check_files(version: str, meta: dict, blobs: dict[str, bytes]) -> None:
    expected = meta.get("files") or {}
    if not isinstance(expected, dict):
        raise RegistryError(f"version {version}: metadata 'files' is a {type(expected).__name__}, not a map")
    names = [n for n in blobs if n not in BOOKKEEPING_FILES]
    _refuse_pickles(names, version)
    absent = [n for n in REQUIRED_FILES if n not in expected]
    if absent:
        raise RegistryError(f"version {version}: metadata lists no {absent}; not an adapter version")
    missing = sorted(set(expected) - set(names))
    extra = sorted(set(names) - set(expected))
    if missing or extra:
        raise RegistryError(f"version {version}: missing files {missing}, unexpected files {extra}")
    for name, digest in expected.items():
        actual = sha256_of(blobs[name])
        if actual != digest:
            raise RegistryError(f"version {version}: checksum mismatch for {name} "
                                f"(expected {digest[:12]}…, got {actual[:12]}…); refusing a corrupted adapter")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
