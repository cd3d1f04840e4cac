"""The proxy filter's header rules: what is hop-by-hop (never forwarded, either way) and how the client's
headers become the upstream request's (RFC 9110 §7.6.1)."""

from __future__ import annotations

from collections.abc import Sequence

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
_CONNECTION_LENGTHS = (len(_CONNECTION_NAMES[0]), len(_CONNECTION_NAMES[1]))


def connection_listed(headers: Sequence[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Names listed in ``Connection`` / ``Proxy-Connection``: hop-by-hop for this message (RFC 9110 §7.6.1).
    Names that are hop-by-hop anyway (``keep-alive``, ``close``) are left out."""
    names: frozenset[bytes] = _NO_NAMES
    for k, v in headers:
        if len(k) in _CONNECTION_LENGTHS and k.lower() in _CONNECTION_NAMES:  # the length test skips the others
            listed = _LISTED.get(v)
            if listed is None:
                listed = frozenset(t.strip().lower() for t in v.split(b",") if t.strip()) - HOP_BY_HOP - _NOT_NAMES
                if len(_LISTED) < 256:  # a handful of distinct values in practice
                    _LISTED[v] = listed
            if listed:
                names = names | listed
    return names


_LISTED: dict[bytes, frozenset[bytes]] = {}  # a Connection value -> the names it adds to HOP_BY_HOP
_NOT_NAMES = frozenset({b"close"})  # a connection option, not a header name


def header_value(raw: bytes) -> str:
    """Both clients encode header values as UTF-8: decode valid UTF-8 as such so non-ASCII values round-trip."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


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
            try:
                out.append((name, v.decode("utf-8")))  # header_value, inlined (one call for valid UTF-8)
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
    name = "" if k.lower() in HOP_BY_HOP else k.decode("latin-1")
    if len(_NAMES) < 1024:  # names repeat across requests; a client sending endless new names is not cached
        _NAMES[k] = name
    return name


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
            listed = _LISTED.get(v)
            if listed is None:
                listed = connection_listed(((k, v),))
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
    if len(_RESPONSE_NAMES) < 1024:  # names repeat across answers; endless new names are not cached
        _RESPONSE_NAMES[k] = (name, kind)
    return name, kind
