"""Credential redaction for log lines (URLs lose their userinfo and query/fragment values) and for the admin
``/config`` dump (values under secret-looking keys hidden).

``redact_url`` is a pure function with no kvgate dependencies so every module can share it.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import SplitResult, parse_qsl, quote, urlsplit, urlunsplit

REDACTED = "***"


def redact_url(url: str) -> str:
    """``url`` safe to log: userinfo → ``***@``, every query value → ``***``, fragment dropped.

    Scheme, host, port and path are kept (they are what an operator needs to find the upstream).
    Something that does not parse as a URL is returned as ``***`` rather than risk leaking it.
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return REDACTED
    netloc = parts.netloc
    if "@" in netloc:
        if ":" in host:  # IPv6 literal
            host = f"[{host}]"
        netloc = f"{REDACTED}@{host}" + (f":{port}" if port is not None else "")
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = "&".join(f"{quote(k, safe='')}={REDACTED}" for k, _ in pairs) if pairs else REDACTED
    return urlunsplit(SplitResult(parts.scheme, netloc, parts.path, query, ""))


_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@?#]*@")


def redact_userinfo(text: str) -> str:
    """Free text (e.g. an exception message) with the userinfo of every embedded URL replaced by ``***``."""
    return _USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", text)


# /config: any key containing one of these words (case-insensitive) has its string value hidden
SECRET_KEY_WORDS = ("token", "secret", "key", "password", "passwd", "auth", "credential", "cookie")


def _secret_key(key: str) -> bool:
    k = key.lower()
    return any(w in k for w in SECRET_KEY_WORDS)


def redact_secrets(obj: Any, key: str = "") -> Any:
    """A config dump safe to show (the admin ``/config``): string values under keys like ``*token*``,
    ``*secret*``, ``*key*``, ``*password*``, ``*auth*`` become ``***``; URLs anywhere lose their userinfo and
    query values (:func:`redact_url`)."""
    if isinstance(obj, dict):
        return {k: redact_secrets(v, str(k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact_secrets(v, key) for v in obj]
    if isinstance(obj, str):
        if obj and key and _secret_key(key):
            return REDACTED
        if "://" in obj:
            return redact_url(obj)
    return obj
