"""Adapter registry boundary: versions on a folder or fsspec URL, active pointer in file, Redis or memory."""

from __future__ import annotations

import hashlib
import os

from loraloop.registry.pointer import (
    ActivePointer,
    FilePointerStore,
    MemoryPointerStore,
    PointerStore,
    RedisPointerStore,
)
from loraloop.registry.store import AdapterRegistry, RegistryError, VersionInfo, check_version_name
from loraloop.settings import Settings

__all__ = ["ActivePointer", "AdapterRegistry", "PointerStore", "RegistryError", "VersionInfo",
           "check_version_name", "make_registry", "pointer_key"]

_memory_pointers: dict[str, MemoryPointerStore] = {}


def pointer_key(url: str) -> str:
    """Redis key of a registry's pointer: every process naming the same registry agrees on it."""
    canonical = url if "://" in url else os.path.abspath(url)
    return f"loraloop:registry:{hashlib.sha1(canonical.encode()).hexdigest()[:12]}:pointer"


def make_registry(settings: Settings, *, redis_client: object | None = None) -> AdapterRegistry:
    """The registry at ``settings.registry_url`` with the pointer store the settings name."""
    url = settings.registry_url
    kind = settings.registry_pointer
    if kind == "auto":
        kind = "redis" if settings.redis_url else "file"
    if url.startswith("memory://") and kind == "file":
        kind = "memory"
    if kind == "redis":
        if redis_client is None:
            import redis

            redis_client = redis.Redis.from_url(settings.redis_url, socket_timeout=5)
        pointer: PointerStore = RedisPointerStore(redis_client, pointer_key(url))
    elif kind == "memory":
        pointer = _memory_pointers.setdefault(url, MemoryPointerStore())
    else:
        import fsspec

        fs, root = fsspec.core.url_to_fs(url)
        fs.makedirs(root, exist_ok=True)
        pointer = FilePointerStore(fs, root.rstrip("/"))
    return AdapterRegistry(url, pointer, poll_s=settings.adapter_poll_s)
