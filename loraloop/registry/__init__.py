"""Adapter registry boundary: versions on a folder or fsspec URL, active pointer in ``pointer.json``.

With Redis configured the pointer file stays the source of truth; Redis holds a copy and
carries change notifications (see :mod:`loraloop.registry.pointer`).
"""

from __future__ import annotations

import hashlib
import os

from loraloop.redact import mask_url
from loraloop.registry.errors import RegistryError, check_version_name
from loraloop.registry.pointer import (
    ActivePointer,
    FilePointerStore,
    MemoryPointerStore,
    PointerStore,
    RedisPointerStore,
)
from loraloop.registry.probation import Probation, ProbationTerms
from loraloop.registry.signing import load_private_key, load_public_key
from loraloop.registry.store import AdapterRegistry, VersionInfo
from loraloop.settings import Settings

__all__ = ["ActivePointer", "AdapterRegistry", "PointerStore", "Probation", "ProbationTerms", "RegistryError", "VersionInfo",
           "check_version_name", "make_registry", "mask_url", "pointer_key"]

_memory_pointers: dict[str, MemoryPointerStore] = {}


def pointer_key(url: str) -> str:
    """Redis key of a registry's pointer copy: every process naming the same registry agrees on it."""
    canonical = url if "://" in url else os.path.abspath(url)
    return f"loraloop:registry:{hashlib.sha1(canonical.encode()).hexdigest()[:12]}:pointer"


def make_registry(settings: Settings, *, redis_client: object | None = None) -> AdapterRegistry:
    """The registry at ``settings.registry_url`` with the pointer store, keys and head capacity the settings name.

    Raises:
        RegistryError: a configured key cannot be read, or the two keys do not match.
    """
    url = settings.registry_url
    kind = settings.registry_pointer
    if kind == "auto":
        kind = "redis" if settings.redis_url else "file"
    if url.startswith("memory://") and kind == "file":
        kind = "memory"
    if kind == "memory":
        pointer: PointerStore = _memory_pointers.setdefault(url, MemoryPointerStore())
    else:
        import fsspec

        fs, root = fsspec.core.url_to_fs(url)
        fs.makedirs(root, exist_ok=True)
        pointer = FilePointerStore(fs, root.rstrip("/"))
        if kind == "redis":
            if redis_client is None:
                import redis

                # Short timeouts: a Redis outage must only slow watchers down to polling pointer.json.
                redis_client = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=2)
            pointer = RedisPointerStore(pointer, redis_client, pointer_key(url))
    signing = settings.registry_signing_key.get_secret_value()
    return AdapterRegistry(url, pointer, poll_s=settings.adapter_poll_s,
                           signing_key=load_private_key(signing) if signing else None,
                           verify_key=load_public_key(settings.registry_verify_key)
                           if settings.registry_verify_key else None,
                           label_capacity=settings.label_capacity,
                           probation=ProbationTerms(settings.guard_window_s, settings.guard_watch_limit_s,
                                                    settings.guard_min_judged) if settings.guard_probation else None)
