"""The proxy filter's upstream client on aiohttp.

One session per filter: no total connection cap, ``maxConnsPerHost`` as aiohttp's per-host limit (a wait for a
free connection happens inside :meth:`AiohttpTransport.send`, under the proxy's header timeout), idle
connections closed after ``keepalive_timeout``. The client's path bytes go out as they are
(``URL(..., encoded=True)``, memoised per target), no header is added (``skip_auto_headers``, applied once by
:class:`_ForwardRequest`), no body is decoded (``auto_decompress=False``) and no cookie is kept (an upstream's
Set-Cookie is for the client that got it).
"""

from __future__ import annotations

from collections.abc import Sequence

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from kvgate.filters.upstream.base import TransportSettings, UpstreamBroken, UpstreamConnectError
from kvgate.payload import request_body

# aiohttp adds Accept, Accept-Encoding, User-Agent and Content-Type when absent: forward the client's as sent.
SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
_SKIPPED: CIMultiDict[None] = CIMultiDict((h, None) for h in sorted(SKIP_AUTO_HEADERS))


class _ForwardRequest(aiohttp.ClientRequest):
    """aiohttp's request with every automatic header skipped, decided once: aiohttp builds its skip table per
    request (a sort, two multidicts and a copy of the headers: ~20 k instructions, 3% of a proxied request) only
    to add nothing when all of them are skipped. Content-Type is read from the table later (never guessed for
    the body). ``_skip_auto_headers`` is the attribute aiohttp >= 3.11.8 reads (hence the floor in pyproject);
    tests/gateway/test_headers.py pins that nothing is added and the client's own are kept."""

    def update_auto_headers(self, skip_auto_headers: object) -> None:
        self._skip_auto_headers = _SKIPPED


class AiohttpAnswer:
    __slots__ = ("_content", "_read", "_released", "_resp")

    def __init__(self, resp: aiohttp.ClientResponse):
        self._resp = resp
        self._content = resp.content
        self._released = False
        self._read = False  # the body has been read from

    @property
    def status(self) -> int:
        return self._resp.status

    def raw_headers(self) -> Sequence[tuple[bytes, bytes]]:
        return self._resp.raw_headers

    def read_complete(self) -> bytes | None:
        content = self._content
        if not content.is_eof():
            return None
        self._read = True
        return content.read_nowait()

    def read_nowait(self) -> bytes:
        self._read = True
        return self._content.read_nowait()

    def at_eof(self) -> bool:
        return self._content.at_eof()

    async def read(self) -> bytes:
        return await self._content.readany()

    def release(self) -> None:
        if not self._released:
            self._released = True
            try:  # (not contextlib.suppress: a context-manager object per answer)
                # A body never read from (a retried error answer): aiohttp keeps the connection when the whole
                # body arrived, else closes it. A body cut while streaming: closed.
                if self._content.at_eof() or not self._read:
                    self._resp.release()
                else:
                    self._resp.close()
            except Exception:  # the connection is dropped either way
                pass


# Request targets repeat (a few API paths per endpoint): those up to _URL_MEMO_LEN characters are kept, up to
# _URL_MEMO_CAP of them (a long or one-off query string is parsed each time and never pins memory).
_URL_MEMO_CAP = 1024
_URL_MEMO_LEN = 256


class AiohttpTransport:
    def __init__(self, settings: TransportSettings):
        self.settings = settings
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[str, URL] = {}  # origin + target -> its URL (yarl parses even an encoded one)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=0,
                limit_per_host=self.settings.max_conns_per_host,
                ttl_dns_cache=300,
                keepalive_timeout=self.settings.keepalive_timeout,
                enable_cleanup_closed=True,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),  # a Set-Cookie is the client's: never kept for others
                auto_decompress=False,
                skip_auto_headers=SKIP_AUTO_HEADERS,
                request_class=_ForwardRequest,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.settings.connect_timeout),
            )
        return self._session

    async def send(
        self, method: str, origin: str, target: str, headers: list[tuple[str, str]], body: bytes
    ) -> AiohttpAnswer:
        raw = origin + target
        url = self._urls.get(raw)
        if url is None:
            url = URL(raw, encoded=True)  # forward the client's path bytes as they are
            if len(raw) <= _URL_MEMO_LEN and len(self._urls) < _URL_MEMO_CAP:
                self._urls[raw] = url
        try:
            resp = await self._client().request(
                method,
                url,
                data=request_body(body) if body else None,
                headers=headers,
                allow_redirects=False,
                compress=False,
            )
        except TimeoutError:  # also aiohttp's connect timeout (ServerTimeoutError)
            raise
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamConnectError(str(exc), type(exc.os_error).__name__) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamBroken(str(exc), type(exc).__name__) from exc
        return AiohttpAnswer(resp)

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
