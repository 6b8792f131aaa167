"""Masking of credentials in URLs before they are printed or logged."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
_SECRET_QUERY_KEYS = ("password", "passwd", "secret", "token", "key", "credential", "signature", "sig")
_USERINFO = re.compile(r"(?<=://)[^/@]*@")


def mask_url(url: str) -> str:
    """``url`` with its password (and secret-looking query values) replaced by ``***``.

    The user name is kept (it says which account, not how to log in); a string that is
    not a URL is returned unchanged.

    Args:
        url: any URL or path, e.g. ``redis://:pw@host:6379/0`` or ``s3://key:secret@bucket/x``.

    Returns:
        The URL safe to print.

    Example:
        >>> mask_url("redis://:hunter2@cache:6379/0")
        'redis://:***@cache:6379/0'
        >>> mask_url("s3://AKIA:s3cr3t@bucket/registry?token=abc&region=eu")
        's3://AKIA:***@bucket/registry?token=%2A%2A%2A&region=eu'
        >>> mask_url("./loraloop-registry")
        './loraloop-registry'
    """
    if not isinstance(url, str) or "://" not in url:
        return url
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, host = netloc.rsplit("@", 1)
            user, has_password, _ = userinfo.partition(":")
            netloc = f"{user}:{MASK}@{host}" if has_password else f"{MASK}@{host}" if _looks_secret(user) else netloc
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            if any(_is_secret_key(k) for k, _ in pairs):
                query = urlencode([(k, MASK if _is_secret_key(k) else v) for k, v in pairs])
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:  # unparsable (e.g. a bad port): mask everything before the last "@" of the authority
        return _USERINFO.sub(f"{MASK}@", url)


def _is_secret_key(key: str) -> bool:
    return any(word in key.lower() for word in _SECRET_QUERY_KEYS)


def _looks_secret(user: str) -> bool:
    # A lone user part that is long and random is a token (``https://<token>@host``), not a name.
    return len(user) >= 20
