"""The client's request headers as a listener forwards them: the decision-headers token taken out (and checked),
``X-Forwarded-For`` / ``Forwarded`` by the listener's trust rule (``xff_num_trusted_hops``) with this hop's
entries appended."""

from __future__ import annotations

import functools
import hmac
import ipaddress

from kvgate.asgi import Scope
from kvgate.config import HttpConnectionManager


class ClientHeaders:
    """One listener's rules, applied per request: ``headers, show_decisions = client_headers(scope)``."""

    def __init__(self, hcm: HttpConnectionManager):
        self.token_name = hcm.decision_headers_token_header.lower().encode("latin-1")
        self.token = hcm.decision_headers_token.encode() if hcm.decision_headers_token else b""
        self.show_decisions: bool = hcm.decision_headers
        self.trust_xff: bool = hcm.xff_num_trusted_hops > 0
        # this hop's two headers per client address and scheme
        self._peer: dict[tuple[str, str], tuple[tuple[bytes, bytes], tuple[bytes, bytes]]] = {}

    def __call__(self, scope: Scope) -> tuple[list[tuple[bytes, bytes]], bool]:
        """The headers to forward (debug token removed, X-Forwarded-For / Forwarded per the trust rule) and
        whether this request may see the decision headers."""
        token_name = self.token_name
        show = self.show_decisions
        out: list[tuple[bytes, bytes]] = []
        xff: list[bytes] | None = None
        fwd: list[bytes] | None = None
        for h in scope.get("headers", ()):
            k = h[0]
            if k == token_name:
                if self.token and hmac.compare_digest(h[1], self.token):
                    show = True
                continue  # a credential: never forwarded
            if k == b"x-forwarded-for":
                xff = [*(xff or ()), h[1]]
            elif k == b"forwarded":
                fwd = [*(fwd or ()), h[1]]
            else:
                out.append(h)
        client = scope.get("client")
        if client:
            peer = str(client[0])
            proto = scope.get("scheme", "http")
            own = self._peer.get((peer, proto))
            if own is None:
                own = self._own_forwarded(peer, proto)
            if self.trust_xff and (xff or fwd):
                x, f = own
                if xff:
                    x = (x[0], b", ".join([*xff, x[1]]))
                if fwd:
                    f = (f[0], b", ".join([*fwd, f[1]]))
                own = (x, f)
            out.extend(own)
        return out, show

    def _own_forwarded(self, peer: str, proto: str) -> tuple[tuple[bytes, bytes], tuple[bytes, bytes]]:
        """This hop's X-Forwarded-For and Forwarded headers for a client address (kept per address)."""
        node = f'"[{peer}]"' if _is_ipv6(peer) else peer
        own = (
            (b"x-forwarded-for", peer.encode("latin-1")),
            (b"forwarded", f"for={node};proto={proto}".encode("latin-1")),
        )
        if len(self._peer) >= 4096:  # many distinct clients: start over rather than grow without end
            self._peer.clear()
        self._peer[(peer, proto)] = own
        return own


@functools.lru_cache(maxsize=1024)
def _is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False
