"""The versioned adapter registry on a local folder or any fsspec URL.

Layout under the root::

    versions/<version>/           adapter_model.safetensors, adapter_config.json, labels.json, metadata.json, _COMPLETE
    status/<version>.json         mutable annotations (rejected, with evidence)
    cycles/<time>-<id>.json       one outcome per learner cycle
    pointer.json                  active version + history (file pointer store)

A version folder is immutable once published: it is written under a temporary name
and renamed (local) or completed by a ``_COMPLETE`` marker written last (object
stores), so a half-written version is never listed. Version ids carry a sequence
number handed out by the pointer store and a random suffix: never reused.
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

from loraloop.model import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LABELS_FILE, METADATA_FILE
from loraloop.registry.pointer import ActivePointer, PointerStore, _is_local, write_atomic

logger = logging.getLogger(__name__)

REQUIRED_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG, LABELS_FILE)
COMPLETE_MARKER = "_COMPLETE"
VERSION_PATTERN = re.compile(r"^v\d{6}-\d{8}T\d{6}-[0-9a-f]{6}\Z")  # \Z: "$" would accept a trailing newline
# Formats that can run code when loaded: never stored, never served.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")


class RegistryError(ValueError):
    """A refused registry operation; the message names the offending value."""


@dataclass(frozen=True)
class VersionInfo:
    version: str
    parent: str | None
    created_at: float
    metadata: dict = field(default_factory=dict)
    status: dict = field(default_factory=dict)


def check_version_name(version: str) -> str:
    """Return ``version`` if it is a well-formed id; refuse anything else (``../../etc`` included)."""
    if not isinstance(version, str) or not VERSION_PATTERN.match(version):
        raise RegistryError(f"invalid adapter version name {version!r}: expected e.g. v000001-20260101T000000-a1b2c3")
    return version


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _refuse_pickles(names: list[str], where: str) -> None:
    bad = [n for n in names if n.lower().endswith(PICKLE_SUFFIXES)]
    if bad:
        raise RegistryError(f"{where}: refusing pickled weight file(s) {bad}; adapters must be safetensors")


class AdapterRegistry:
    """Versions of LoRA adapters and the pointer to the active one."""

    def __init__(self, url: str, pointer: PointerStore, poll_s: float = 0.5) -> None:
        self.fs, root = fsspec.core.url_to_fs(url)
        self.root = root.rstrip("/") or "/"
        self.url = url
        self.pointer = pointer
        self.poll_s = poll_s
        self.fs.makedirs(f"{self.root}/versions", exist_ok=True)

    # --- paths -------------------------------------------------------------------------
    def _dir(self, version: str) -> str:
        return f"{self.root}/versions/{check_version_name(version)}"

    def _read_json(self, path: str) -> dict:
        return json.loads(_read(self.fs, path))

    # --- publishing ----------------------------------------------------------------------
    def publish(self, src_dir: str | Path, *, parent: str | None = None, metadata: dict | None = None) -> str:
        """Copy an adapter folder in as a new immutable version; return its id.

        Raises:
            RegistryError: a required file is missing, a pickled file is present, or the parent is unknown.
        """
        src = Path(src_dir)
        names = sorted(p.name for p in src.iterdir() if p.is_file()) if src.is_dir() else []
        _refuse_pickles(names, str(src))
        missing = [n for n in REQUIRED_FILES if n not in names]
        if missing:
            raise RegistryError(f"{src}: not an adapter folder, missing {missing}")
        if parent is not None:
            self.show(parent)
        blobs = {n: (src / n).read_bytes() for n in REQUIRED_FILES}
        version = self._new_version_id()
        meta = dict(metadata or {})
        meta.update(version=version, parent=parent, created_at=time.time(),
                    files={n: sha256_of(b) for n, b in blobs.items()})
        blobs[METADATA_FILE] = json.dumps(meta, indent=1, sort_keys=True).encode()
        self._write_version(version, blobs)
        logger.info("published adapter version %s (parent %s)", version, parent)
        return version

    def _new_version_id(self) -> str:
        pointer = self.pointer.update(lambda p: replace(p, sequence=p.sequence + 1))
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        return f"v{pointer.sequence:06d}-{stamp}-{secrets.token_hex(3)}"

    def _write_version(self, version: str, blobs: dict[str, bytes]) -> None:
        final = self._dir(version)
        if self.fs.exists(final):
            raise RegistryError(f"version {version} already exists; version ids are never reused")
        if _is_local(self.fs):
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

    # --- reading -------------------------------------------------------------------------
    def versions(self) -> list[VersionInfo]:
        """Every complete version, oldest first."""
        out = []
        for path in self.fs.ls(f"{self.root}/versions", detail=False):
            name = path.rstrip("/").rsplit("/", 1)[-1]
            if VERSION_PATTERN.match(name) and self.fs.exists(f"{path}/{COMPLETE_MARKER}"):
                out.append(self.show(name))
        return sorted(out, key=lambda v: v.version)

    def show(self, version: str) -> VersionInfo:
        folder = self._dir(version)
        if not self.fs.exists(f"{folder}/{COMPLETE_MARKER}"):
            raise RegistryError(f"unknown adapter version {version!r}")
        meta = self._read_json(f"{folder}/{METADATA_FILE}")
        status_path = f"{self.root}/status/{version}.json"
        status = self._read_json(status_path) if self.fs.exists(status_path) else {}
        return VersionInfo(version, meta.get("parent"), float(meta.get("created_at", 0)), meta, status)

    def verify(self, version: str) -> None:
        """Refuse a version with a missing, extra, pickled or corrupted file."""
        folder = self._dir(version)
        meta = self.show(version).metadata
        _check_files(version, meta, {n: _read(self.fs, f"{folder}/{n}") for n in self._names(folder)})

    def _names(self, folder: str) -> list[str]:
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(folder, detail=False)]

    def fetch(self, version: str, dest_dir: str | Path) -> Path:
        """A verified local copy of ``version`` in ``dest_dir/<version>`` (reused when already verified)."""
        folder = self._dir(version)
        dest = Path(dest_dir) / version
        meta = self.show(version).metadata
        if dest.is_dir():
            try:
                _check_files(version, meta, {p.name: p.read_bytes() for p in dest.iterdir()})
                return dest
            except RegistryError:
                shutil.rmtree(dest)
        tmp = Path(dest_dir) / f".tmp-{version}-{secrets.token_hex(3)}"
        tmp.mkdir(parents=True)
        try:
            blobs = {n: _read(self.fs, f"{folder}/{n}") for n in self._names(folder)}
            _check_files(version, meta, blobs)
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
        """Make ``version`` active (after verifying it); the current one goes on the history."""
        self.verify(version)

        def mutate(p: ActivePointer) -> ActivePointer:
            if p.version == version:
                return p
            history = (*p.history, p.version) if p.version else p.history
            return replace(p, version=version, generation=p.generation + 1, history=history[-50:],
                           reason=reason, updated_at=time.time())

        pointer = self.pointer.update(mutate)
        logger.info("promoted %s (%s); generation %d", version, reason, pointer.generation)
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
    names = [n for n in blobs if n not in (METADATA_FILE, COMPLETE_MARKER)]
    _refuse_pickles(names, version)
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
