"""The proxy filter's header rules: what is hop-by-hop (never forwarded, either way) and how the client's
headers become the upstream request's (RFC 9110 §7.6.1)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

V = TypeVar("V")

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
        b"expect",
        b"proxy-connection",
    }
)
# Set by the gateway's own HTTP server; an upstream copy would duplicate them (RFC 9110: one Date).
RESPONSE_DROP = HOP_BY_HOP | {b"date", b"server"}


_NO_NAMES: frozenset[bytes] = frozenset()
_CONNECTION_NAMES = (b"connection", b"proxy-connection")
_NOT_NAMES = frozenset({b"close"})  # a connection option, not a header name
_MEMO_CAP = 1024  # names and Connection values repeat; a peer sending endless new ones is not remembered


def _remember(memo: dict[bytes, V], key: bytes, value: V) -> V:
    if len(memo) < _MEMO_CAP:
        memo[key] = value
    return value


def listed_names(value: bytes) -> frozenset[bytes]:
    """The header names a ``Connection`` value lists, beyond those hop-by-hop anyway (``keep-alive``) and
    ``close``: hop-by-hop for this message (RFC 9110 §7.6.1)."""
    names = _LISTED.get(value)
    if names is None:
        parsed = frozenset(t.strip().lower() for t in value.split(b",") if t.strip())
        names = _remember(_LISTED, value, parsed - HOP_BY_HOP - _NOT_NAMES)
    return names


_LISTED: dict[bytes, frozenset[bytes]] = {}


def connection_listed(headers: Sequence[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """The names all ``Connection`` / ``Proxy-Connection`` headers of a message list (:func:`listed_names`)."""
    names = _NO_NAMES
    for k, v in headers:
        if k.lower() in _CONNECTION_NAMES:
            names = names | listed_names(v)
    return names


def request_headers(headers: list[tuple[bytes, bytes]], api_key: str | None) -> list[tuple[str, str]]:
    """The client's headers minus hop-by-hop ones; an endpoint ``api_key`` replaces the client's Authorization."""
    out: list[tuple[str, str]] = []
    listed = False
    names = _NAMES
    for k, v in headers:
        name = names.get(k)
        if name is None:
            name = _name(k)
        if name:
            try:  # both clients encode values as UTF-8: valid UTF-8 is decoded as such, so non-ASCII round-trips
                out.append((name, v.decode()))  # UTF-8 (without the argument: CPython's shorter path)
            except UnicodeDecodeError:
                out.append((name, v.decode("latin-1")))
        elif k.lower() in _CONNECTION_NAMES:
            listed = True
    if listed:  # names the Connection header lists are hop-by-hop for this message: drop them too
        drop = {n.decode("latin-1") for n in connection_listed(headers)}
        out = [(k, v) for k, v in out if k.lower() not in drop]
    if api_key:
        out = [(k, v) for k, v in out if k.lower() != "authorization"]
        out.append(("Authorization", f"Bearer {api_key}"))
    return out


def _name(k: bytes) -> str:
    """A request header name as forwarded (latin-1 text), or ``""`` when it is hop-by-hop; kept in :data:`_NAMES`."""
    return _remember(_NAMES, k, "" if k.lower() in HOP_BY_HOP else k.decode("latin-1"))


_NAMES: dict[bytes, str] = {}  # a request header name -> its forwarded form ("" = hop-by-hop)


def response_headers(raw: Sequence[tuple[bytes, bytes]]) -> tuple[list[tuple[bytes, bytes]], bytes | None]:
    """An upstream answer's headers as forwarded to the client (names lower-cased, hop-by-hop ones and Date /
    Server dropped) with its ``Content-Length`` appended (the first one, unless the body is chunked), and that
    length."""
    headers = []
    length: bytes | None = None
    chunked = False
    extra: frozenset[bytes] | None = None
    names = _RESPONSE_NAMES
    for k, v in raw:
        entry = names.get(k)
        if entry is None:
            entry = _response_name(k)
        name, kind = entry
        if kind == _FORWARD:
            headers.append((name, v))
        elif kind == _LENGTH:
            if length is None:
                length = v
        elif kind == _ENCODING:
            chunked = chunked or b"chunked" in v.lower()
        elif kind == _CONNECTION:
            listed = listed_names(v)
            if listed:
                extra = listed if extra is None else extra | listed
    if extra:  # names the Connection header lists are hop-by-hop for this message: drop them too
        headers = [h for h in headers if h[0] not in extra]
    if chunked or not length:
        return headers, None
    headers.append((b"content-length", length))
    return headers, length


_FORWARD, _DROP, _LENGTH, _ENCODING, _CONNECTION = range(5)
# an answer's header name -> (its lower-cased form, what happens to it)
_RESPONSE_NAMES: dict[bytes, tuple[bytes, int]] = {}


def _response_name(k: bytes) -> tuple[bytes, int]:
    name = k.lower()
    kind = _FORWARD
    if name == b"content-length":
        kind = _LENGTH
    elif name == b"transfer-encoding":
        kind = _ENCODING
    elif name in _CONNECTION_NAMES:
        kind = _CONNECTION
    elif name in RESPONSE_DROP:
        kind = _DROP
    return _remember(_RESPONSE_NAMES, k, (name, kind))
