"""Run ASGI apps on loopback sockets, in the current event loop or in a thread.

Used by the CLI, the simulator, benchmarks and tests. Binding happens here (port 0 = ephemeral),
so the caller learns the real port before any request is made.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import uvicorn

from kvgate.httpproto import GatewayHttpProtocol, ServerLimits

T = TypeVar("T")

log = logging.getLogger("kvgate.serving")

DEFAULT_HOST = "127.0.0.1"


def bind_socket(host: str = DEFAULT_HOST, port: int = 0, *, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket. ``reuse_port``: SO_REUSEPORT, so several worker processes listen on one port
    and the kernel spreads new connections over them (``kvgate serve --workers N``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY on accepted sockets only when their proto says
    # TCP, and Nagle + delayed ACK otherwise add ~40 ms to responses written as headers, then body.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepted sockets on Linux
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def reserve_port(host: str = DEFAULT_HOST) -> socket.socket:
    """A bound, not listening SO_REUSEPORT socket on an ephemeral port: holds the port number while worker
    processes bind it with :func:`bind_socket` ``(reuse_port=True)`` (a socket that does not listen gets no
    connections)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, 0))
    return sock


@dataclass
class ServerHandle:
    """A running uvicorn server bound to ``host:port``."""

    host: str
    port: int
    _server: uvicorn.Server
    _task: asyncio.Task[None] | None = None
    _sock: socket.socket | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def stop(self, graceful_timeout: float | None = 5.0) -> None:
        """Stop accepting, let in-flight responses finish for ``graceful_timeout`` seconds, then close the
        connections still busy (one WARNING line; the applications see a client disconnect, no traceback)."""
        self._server.should_exit = True
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout=graceful_timeout)
            except TimeoutError:
                conns = list(self._server.server_state.connections)
                for conn in conns:
                    transport = getattr(conn, "transport", None)
                    if transport is not None and not transport.is_closing():
                        transport.close()
                if conns:
                    log.warning(
                        "drain timeout (%gs) on %s: closed %d connection(s) with responses in flight",
                        graceful_timeout or 0,
                        self.url,
                        len(conns),
                    )
                try:
                    await asyncio.wait_for(asyncio.shield(self._task), timeout=2.0)
                except TimeoutError:
                    self._server.force_exit = True
                    with contextlib.suppress(Exception):
                        await self._task
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()


def _config(app: Any, log_level: str, limits: ServerLimits) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        log_level=log_level,
        log_config=None,  # uvicorn's records propagate to the process's logging set-up (one format)
        access_log=False,
        lifespan="auto",
        http=GatewayHttpProtocol.with_limits(limits),  # uvicorn's httptools protocol + client limits
        ws="none",  # a WebSocket upgrade is refused with a JSON 400 (the gateway proxies HTTP only)
        loop="none",
        timeout_graceful_shutdown=None,  # ServerHandle.stop drains and cuts (no cancelled-task tracebacks)
        timeout_keep_alive=max(1, round(limits.idle_timeout)),
        proxy_headers=False,  # the gateway applies its own X-Forwarded-For trust rule (xff_num_trusted_hops)
        server_header=False,  # no "server: uvicorn" on every answer (nothing to disclose; one header less to write)
    )


async def start_server(
    app: Any,
    host: str = DEFAULT_HOST,
    port: int = 0,
    *,
    log_level: str = "warning",
    timeout_graceful_shutdown: float | None = 10.0,
    ready_timeout: float = 10.0,
    limits: ServerLimits | None = None,
    reuse_port: bool = False,
) -> ServerHandle:
    """Start ``app`` in the running loop; return once it accepts connections. The drain time is given
    to :meth:`ServerHandle.stop` (``timeout_graceful_shutdown`` is kept for callers' compatibility)."""
    sock = bind_socket(host, port, reuse_port=reuse_port)
    real_port = sock.getsockname()[1]
    server = uvicorn.Server(_config(app, log_level, limits or ServerLimits()))
    task = asyncio.create_task(server.serve(sockets=[sock]), name=f"uvicorn:{host}:{real_port}")
    handle = ServerHandle(host=host, port=real_port, _server=server, _task=task, _sock=sock)
    deadline = asyncio.get_running_loop().time() + ready_timeout
    while not server.started:
        if task.done():
            task.result()  # re-raise the startup error
            raise RuntimeError(f"server on {host}:{real_port} exited during startup")
        if asyncio.get_running_loop().time() > deadline:
            await handle.stop(1.0)
            raise TimeoutError(f"server on {host}:{real_port} did not start in {ready_timeout}s")
        await asyncio.sleep(0.005)
    return handle


class ThreadedServer:
    """An ASGI app served from its own event loop in a daemon thread (for sync tests/tools)."""

    def __init__(self, app: Any, host: str = DEFAULT_HOST, port: int = 0, log_level: str = "warning"):
        self._app = app
        self._host = host
        self._port = port
        self._log_level = log_level
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: ServerHandle | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        assert self._handle is not None
        return self._handle.url

    @property
    def port(self) -> int:
        assert self._handle is not None
        return self._handle.port

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    def start(self) -> ThreadedServer:
        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                self._handle = loop.run_until_complete(
                    start_server(self._app, self._host, self._port, log_level=self._log_level)
                )
            except BaseException as exc:  # reported to the starting thread
                self._error = exc
                self._ready.set()
                loop.close()
                return
            self._ready.set()
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=run, name="kvgate-threaded-server", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        if self._handle is None:
            raise TimeoutError("threaded server did not start")
        return self

    def stop(self) -> None:
        if self._loop is None or self._handle is None:
            return
        fut = asyncio.run_coroutine_threadsafe(self._handle.stop(2.0), self._loop)
        with contextlib.suppress(Exception):
            fut.result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._handle = None

    def __enter__(self) -> ThreadedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def serve_in_thread(app: Any, host: str = DEFAULT_HOST, port: int = 0) -> Iterator[ThreadedServer]:
    server = ThreadedServer(app, host, port).start()
    try:
        yield server
    finally:
        server.stop()


def setup_logging(level: str) -> None:
    """The gateway's log format on the root logger (``kvgate serve`` and each ``--workers`` process)."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion on a fresh loop: uvloop when available (faster sockets), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
