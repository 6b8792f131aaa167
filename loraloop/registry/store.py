"""The versioned adapter registry on a local folder or any fsspec URL.

Layout under the root::

    versions/<version>/           adapter_model.safetensors, adapter_config.json, labels.json, metadata.json,
                                  signature (when a signing key is set), _COMPLETE
    status/<version>.json         mutable annotations (rejected, with evidence)
    cycles/<time>-<id>.json       one outcome per learner cycle
    pointer.json                  active version + history (and pointer.json.last-good)

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
    """

    def __init__(self, url: str, pointer: PointerStore, poll_s: float = 0.5, *,
                 signing_key: Ed25519PrivateKey | None = None, verify_key: Ed25519PublicKey | None = None,
                 label_capacity: int | None = None) -> None:
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
    def publish(self, src_dir: str | Path, *, parent: str | None = None, metadata: dict | None = None) -> str:
        """Check an adapter folder and copy it in as a new immutable (and signed) version; return its id.

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

    def promote(self, version: str, reason: str = "manual") -> ActivePointer:
        """Make ``version`` active (after every check of :meth:`verify`); the current one goes on the history."""
        self.verify(version)

        def mutate(p: ActivePointer) -> ActivePointer:
            if p.version == version:
                return p
            history = (*p.history, p.version) if p.version else p.history
            return replace(p, version=version, generation=p.generation + 1, history=history[-HISTORY_LIMIT:],
                           reason=reason, updated_at=time.time())

        pointer = self.pointer.update(mutate)
        logger.info("promoted %s (%s) in %s; generation %d", version, reason, mask_url(self.url), pointer.generation)
        return pointer
    def rollback(self, reason: str = "manual", to: str | None = None) -> ActivePointer:
        """Go back to the previous active version (or to ``to``).

        Raises:
            RegistryError: no previous version, or ``to`` is unknown or corrupted.
        """
        if to is not None:
            self.verify(to)

        def mutate(p: ActivePointer) -> ActivePointer:
            history = list(p.history)
            target = to
            if target is None:
                if not history:
                    raise RegistryError(f"no previous version to roll back to (active: {p.version!r}, empty history)")
                target = history.pop()
            elif target in history:
                del history[len(history) - 1 - history[::-1].index(target):]
            return replace(p, version=target, generation=p.generation + 1, history=tuple(history),
                           reason=f"rollback: {reason}", updated_at=time.time())

        if to is None:
            target = self.active().history[-1:] or [None]
            if target[0] is not None:
                self.verify(target[0])
        pointer = self.pointer.update(mutate)
        logger.warning("rolled back to %s (%s); generation %d", pointer.version, reason, pointer.generation)
        return pointer

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
