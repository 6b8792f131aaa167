"""The registry's error type and version-name rule, shared by the store, the pointer and the checks."""

from __future__ import annotations

import re

VERSION_PATTERN = re.compile(r"^v\d{6}-\d{8}T\d{6}-[0-9a-f]{6}\Z")  # \Z: "$" would accept a trailing newline


class RegistryError(ValueError):
    """A refused registry operation; the message names the offending value."""


def check_version_name(version: str) -> str:
    """Return ``version`` if it is a well-formed id; refuse anything else (``../../etc`` included)."""
    if not isinstance(version, str) or not VERSION_PATTERN.match(version):
        raise RegistryError(f"invalid adapter version name {version!r}: expected e.g. v000001-20260101T000000-a1b2c3")
    return version
