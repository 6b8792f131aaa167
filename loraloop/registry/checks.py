"""Dry-run checks of an adapter's files: the part of the worker's verification that needs no base model.

Run by ``publish`` and ``promote`` (and ``verify``/``fetch``), so that a version a worker would
refuse is refused at the door, with the reason, instead of leaving a freshly started worker
without an adapter. Files are inspected with ``lstat`` before anything is opened, and opened
with ``O_NOFOLLOW | O_NONBLOCK``, so a symlink or a FIFO planted in a folder is refused and
never blocks the reader.
"""

from __future__ import annotations

import json
import os
import stat

import fsspec

from loraloop.model import ADAPTER_CONFIG, ADAPTER_WEIGHTS, HEAD_MODULE, LABELS_FILE, LabelMap
from loraloop.registry.errors import RegistryError

# A LoRA adapter with its head copy is a few MB; these bounds stop a planted huge file from
# exhausting a worker's memory long before any real adapter gets near them.
MAX_WEIGHTS_BYTES = 1 << 30
MAX_OTHER_BYTES = 4 << 20
MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors library's own limit


def size_limit(name: str) -> int:
    """Largest accepted size of the file ``name`` in an adapter folder."""
    return MAX_WEIGHTS_BYTES if name == ADAPTER_WEIGHTS else MAX_OTHER_BYTES


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISLNK, "symbolic link"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISDIR, "directory"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return kind
    return "special file"


def check_entry(mode: int, size: int, name: str, where: str) -> None:
    """Refuse anything but a regular file within its size bound (from an ``lstat`` result).

    Raises:
        RegistryError: a symlink, FIFO, directory, device or socket, or a file over its size limit.
    """
    if not stat.S_ISREG(mode):
        raise RegistryError(f"{where}: {name} is a {_kind(mode)}, not a regular file; refusing the adapter")
    limit = size_limit(name)
    if size > limit:
        raise RegistryError(f"{where}: {name} is {size} bytes, over the {limit}-byte limit; refusing the adapter")


def check_local_entries(folder: str, names: list[str], where: str) -> None:
    """``check_entry`` for each name in a local folder, by ``lstat`` (nothing is opened)."""
    for name in names:
        st = os.lstat(os.path.join(folder, name))
        check_entry(st.st_mode, st.st_size, name, where)


def check_remote_entries(fs: fsspec.AbstractFileSystem, folder: str, where: str) -> list[str]:
    """Names in an fsspec folder, refusing entries that are not files or are over their size bound."""
    names = []
    for entry in fs.ls(folder, detail=True):
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if entry.get("type") != "file" or entry.get("islink"):
            raise RegistryError(f"{where}: {name} is a {entry.get('type')!r} entry, not a regular file; "
                                f"refusing the adapter")
        check_entry(stat.S_IFREG, int(entry.get("size") or 0), name, where)
        names.append(name)
    return names


def read_regular_file(path: str, where: str) -> bytes:
    """The bytes of a local regular file, never following a link nor blocking on a FIFO.

    Raises:
        RegistryError: ``path`` is missing, not a regular file, or over its size bound.
    """
    name = os.path.basename(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise RegistryError(f"{where}: {name} is missing") from None
    check_entry(st.st_mode, st.st_size, name, where)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:  # ELOOP: replaced by a symlink since the lstat
        raise RegistryError(f"{where}: cannot open {name} as a regular file ({e.strerror})") from e
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())  # the file actually opened: catches a swap after the lstat
        check_entry(st.st_mode, st.st_size, name, where)
        limit = size_limit(name)
        data = f.read(limit + 1)
    if len(data) > limit:
        raise RegistryError(f"{where}: {name} grew past the {limit}-byte limit while being read")
    return data


def safetensors_header(data: bytes, where: str) -> dict:
    """The parsed JSON header of a safetensors file; refuse anything else (pickles included).

    Raises:
        RegistryError: too short, a header length past the file, a header that is not a JSON
            object, or tensor entries whose offsets fall outside the data.
    """
    what = f"{where}: {ADAPTER_WEIGHTS} is not a safetensors file"
    if len(data) < 8:
        raise RegistryError(f"{what} ({len(data)} bytes, shorter than the 8-byte header length)")
    n = int.from_bytes(data[:8], "little")
    if n > MAX_SAFETENSORS_HEADER or 8 + n > len(data):
        raise RegistryError(f"{what} (header length {n} does not fit a {len(data)}-byte file; "
                            f"first bytes {data[:8]!r})")
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, ValueError) as e:
        raise RegistryError(f"{what} (header is not JSON: {e})") from e
    if not isinstance(header, dict):
        raise RegistryError(f"{what} (header is a {type(header).__name__}, not an object)")
    size = len(data) - 8 - n
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= size):
            raise RegistryError(f"{what} (tensor {key!r} has data_offsets {offsets!r} outside {size} data bytes)")
    return header


def check_weights(data: bytes, where: str) -> int:
    """Refuse weights that are not a safetensors file of finite floating-point tensors; return the count.

    Raises:
        RegistryError: not safetensors, an integer tensor, or a NaN or infinite value (named by key).
    """
    import torch
    from safetensors.torch import load as load_safetensors

    safetensors_header(data, where)
    try:
        tensors = load_safetensors(data)
    except Exception as e:  # safetensors raises its own error type on a damaged file
        raise RegistryError(f"{where}: unreadable {ADAPTER_WEIGHTS} (corrupted?): {e}") from e
    if not tensors:
        raise RegistryError(f"{where}: {ADAPTER_WEIGHTS} holds no tensors")
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise RegistryError(f"{where}: {key} has dtype {tensor.dtype}, expected floating point")
        if not torch.isfinite(tensor).all():
            raise RegistryError(f"{where}: {key} holds NaN or infinite values; refusing the adapter")
    return len(tensors)


def check_labels(data: bytes, where: str, capacity: int | None) -> LabelMap:
    """The label map in ``labels.json`` bytes, refused unless it has 1..``capacity`` distinct labels."""
    try:
        raw = json.loads(data)
        labels = raw.get("labels") if isinstance(raw, dict) else None
        if not isinstance(labels, list):
            raise ValueError(f"expected {{'labels': [...]}}, got {type(raw).__name__}")
        label_map = LabelMap(tuple(labels))
    except (UnicodeDecodeError, ValueError) as e:
        raise RegistryError(f"{where}: invalid {LABELS_FILE}: {e}") from e
    if not len(label_map) or (capacity is not None and len(label_map) > capacity):
        raise RegistryError(f"{where}: {len(label_map)} labels, the head has {capacity} slots (label_capacity); "
                            f"a label map must have 1..{capacity}")
    return label_map


def check_config(data: bytes, where: str) -> dict:
    """Refuse an ``adapter_config.json`` that is not a LoRA config saving the classifier head."""
    try:
        config = json.loads(data)
    except (UnicodeDecodeError, ValueError) as e:
        raise RegistryError(f"{where}: unreadable {ADAPTER_CONFIG}: {e}") from e
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise RegistryError(f"{where}: expected a LoRA adapter config, got peft_type {kind!r}")
    if HEAD_MODULE not in (config.get("modules_to_save") or []):
        raise RegistryError(f"{where}: modules_to_save {config.get('modules_to_save')!r} lacks the "
                            f"{HEAD_MODULE!r} head")
    return config


def check_adapter(blobs: dict[str, bytes], where: str, capacity: int | None) -> None:
    """Every content check of an adapter's three files (weights, config, labels).

    Raises:
        RegistryError: the first failing check, with its reason.
    """
    check_config(blobs[ADAPTER_CONFIG], where)
    check_labels(blobs[LABELS_FILE], where, capacity)
    check_weights(blobs[ADAPTER_WEIGHTS], where)
