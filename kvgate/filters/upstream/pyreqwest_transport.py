"""The proxy filter's upstream client on pyreqwest (Rust reqwest/hyper; the ``fastproxy`` extra).

Imported only when the proxy filter's ``client`` is ``pyreqwest`` (or ``auto`` and it is installed). Set up to
behave like the aiohttp transport:

- streamed bodies with a read-ahead of 0: the head is returned when it arrives and every chunk is handed over
  as it comes (the library's default 64 kB read-ahead holds an event stream's first events back);
- ``maxConnsPerHost`` as a semaphore per endpoint origin (reqwest caps only the total in flight), taken inside
  :meth:`PyreqwestTransport.send`, so its wait counts toward the proxy's header timeout;
- no redirects, no decompression, no proxy from the environment, header names as given (lower case);
- the idle timeout between body chunks is reqwest's read timeout (reset by every read, no Python timer) when it
  is not shorter than the header timeout (else the proxy arms its own timer per wait);
- a body read to the end returns its connection to the pool; one cut short (or never read: a retried error
  answer) is closed by a task awaiting the request's ``__aexit__`` (dropping the objects is not enough while a
  cancelled read is still pending inside the library).

Known differences from aiohttp (documented in README): reqwest adds ``Accept: */*`` and its ``User-Agent`` when
the client sent none; the path goes through the URL parser (percent-encodes ``"<>`{}`` and spaces, turns ``\\``
into ``/``, collapses ``%2e`` dot segments: the gateway refuses literal dot segments before this); answer header
values outside visible ASCII cannot be read from the library and are dropped (counted).
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta

from pyreqwest.client import Client, ClientBuilder
from pyreqwest.exceptions import ConnectError, DetailedPyreqwestError, PyreqwestError
from pyreqwest.request import StreamRequest
from pyreqwest.response import Response, ResponseBodyReader

from kvgate.filters.upstream.base import TransportSettings, UpstreamBroken, UpstreamConnectError

# An answer with a Content-Length up to this is read in one call (one hop to the library's thread, not one per
# chunk plus one for the end) when reqwest's read timeout bounds each gap (with the proxy's timer instead, one
# call would put the whole body under one idle timeout); event streams carry no Content-Length.
WHOLE_BODY_MAX = 256 * 1024


class PyreqwestAnswer:
    __slots__ = ("_closing", "_dropped", "_eof", "_reader", "_req", "_resp", "_slot", "_whole", "status")

    def __init__(
        self,
        req: StreamRequest,
        resp: Response,
        slot: asyncio.Semaphore | None,
        closing: set[asyncio.Task[None]],
        whole_ok: bool,
    ):
        self._req: StreamRequest | None = req
        self._closing = closing  # the transport's close tasks (kept referenced until done)
        self._resp: Response | None = resp
        self._reader: ResponseBodyReader | None = resp.body_reader
        self._slot = slot
        self._eof = False
        self._dropped = 0
        self.status = resp.status
        length = resp.get_header("content-length")
        self._whole = whole_ok and length is not None and length.isdigit() and int(length) <= WHOLE_BODY_MAX

    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        assert self._resp is not None
        h = self._resp.headers
        try:
            return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in h.items()]
        except ValueError:  # a value outside visible ASCII: the library cannot hand it over
            pass
        out: list[tuple[bytes, bytes]] = []
        names = list(h.keys())  # one entry per value
        for k in dict.fromkeys(names):
            try:
                out.extend((k.encode("latin-1"), v.encode("latin-1")) for v in h.getall(k))
            except ValueError:
                self._dropped += names.count(k)
        return out

    def dropped_headers(self) -> int:
        return self._dropped

    def read_nowait(self) -> bytes:
        return b""  # the library offers no peek; read() returns buffered bytes without a wait

    def at_eof(self) -> bool:
        return self._eof

    async def read(self) -> bytes:
        reader = self._reader
        if reader is None:
            return b""
        try:
            if self._whole:
                whole = await reader.bytes()
                self._eof = True
                return whole.to_bytes()
            chunk = await reader.read_chunk()
        except TimeoutError:  # reqwest's read timeout: the idle timeout
            raise
        except PyreqwestError as exc:
            raise UpstreamBroken(str(exc), type(exc).__name__) from exc
        if chunk is None:
            self._eof = True
            return b""
        return chunk.to_bytes()

    def release(self) -> None:
        req = self._req
        self._reader = self._resp = self._req = None
        if req is not None and not self._eof:
            task = asyncio.get_running_loop().create_task(_close(req))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        if self._slot is not None:
            self._slot.release()
            self._slot = None


def _connect_failed(exc: ConnectError) -> bool:
    """The connection could not be made. The library also reports a connection that closed before the answer's
    head as a ConnectError; aiohttp (and the proxy) call that a broken connection."""
    return any(c.get("message") == "client error (Connect)" for c in exc.details.get("causes") or ())


def _cause(exc: PyreqwestError) -> str:
    """The innermost cause's message (``Connection refused (os error 111)``), for logs."""
    causes = exc.details.get("causes") if isinstance(exc, DetailedPyreqwestError) else None
    return str(causes[-1].get("message", "")) if causes else type(exc).__name__


async def _close(req: StreamRequest) -> None:
    """Close an unfinished answer's connection."""
    with contextlib.suppress(Exception):
        await req.__aexit__(None, None, None)


class PyreqwestTransport:
    def __init__(self, settings: TransportSettings):
        self.settings = settings
        self.native_idle_timeout = settings.stream_idle_timeout >= settings.header_timeout
        self._client: Client | None = None
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def _build(self) -> Client:
        s = self.settings
        b = (
            ClientBuilder()
            .max_connections(None)
            .http1_only()
            .http1_lower_case_headers()
            .no_proxy()
            .gzip(False)
            .brotli(False)
            .zstd(False)
            .deflate(False)
            .follow_redirects(False)
            .referer(False)
            .connect_timeout(timedelta(seconds=s.connect_timeout))
            .pool_idle_timeout(timedelta(seconds=s.keepalive_timeout))
        )
        if self.native_idle_timeout:
            # per read, reset by each; also bounds the head's wait, but the proxy's header timeout is not
            # longer, so it fires first there
            b = b.read_timeout(timedelta(seconds=s.stream_idle_timeout))
        return b.build()

    async def send(
        self, method: str, origin: str, target: str, headers: list[tuple[str, str]], body: bytes
    ) -> PyreqwestAnswer:
        client = self._client
        if client is None:
            client = self._client = self._build()
        slot: asyncio.Semaphore | None = None
        cap = self.settings.max_conns_per_host
        if cap:
            slot = self._slots.get(origin)
            if slot is None:
                slot = self._slots[origin] = asyncio.Semaphore(cap)
            await slot.acquire()
        try:
            b = client.request(method, origin + target).headers(headers)
            if body:
                b = b.body_bytes(body)
            req = b.streamed_read_buffer_limit(0).build_streamed()
            resp = await req.__aenter__()
        except BaseException as exc:
            if slot is not None:
                slot.release()
            if isinstance(exc, ConnectError) and _connect_failed(exc):
                raise UpstreamConnectError(str(exc), _cause(exc)) from exc
            if isinstance(exc, PyreqwestError) and not isinstance(exc, TimeoutError):
                raise UpstreamBroken(str(exc), type(exc).__name__) from exc
            raise  # timeouts (connect, read) as TimeoutError; cancellation
        return PyreqwestAnswer(req, resp, slot, self._closing, self.native_idle_timeout)

    async def close(self) -> None:
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        if self._client is not None:
            await self._client.close()
            self._client = None
