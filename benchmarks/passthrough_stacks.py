"""Which server and upstream client for a Python pass-through (issue 12): the floor of other well-kept stacks.

kvgate is uvicorn (httptools, uvloop) in front of an aiohttp client. This benchmark builds the same minimal
pass-through (forward method, path, body and content-type; answer status, content-type, content-length and the
body, streamed) on other servers and clients, and measures each against overhead.py's ``bare`` floor in ONE run,
in front of the same zero-cost upstream (nginx, from overhead.py):

* servers: ``uvicorn`` (httptools, uvloop; the current one), ``granian-asgi`` and ``granian-rsgi`` (1 worker,
  uvloop, HTTP/1), ``aiohttp-web`` (aiohttp's low-level server, uvloop);
* clients: ``aiohttp`` (the current one), ``httpx`` (AsyncClient, HTTP/1), ``pyreqwest``, ``curl-cffi``
  (AsyncSession), ``rnet``; every client is one shared client per process, keep-alive, no per-host cap.

A stack is ``server+client``. By default the server axis runs with the aiohttp client, the client axis with the
uvicorn server, plus the granian servers with pyreqwest; ``--matrix`` runs every pair. Libraries are
imported lazily: a stack whose library is missing or does not start is skipped with a note (the project venv
has only uvicorn, aiohttp and httpx); one that answers wrong stops the run.

Each stack runs in its own process (``python passthrough_stacks.py --serve SERVER --client CLIENT``) on a
127.0.0.1 ephemeral port. Before it is measured it is verified twice: against a small echo upstream (method,
path with query, content-type and body arrive intact; a 240 kB answer and a chunked answer come back byte for
byte with the upstream's content-type and content-length, the chunked one streamed: its first event
arrives before the upstream's pause ends) and against nginx (the exact reply). Then
``wrk -t1`` (overhead.py's ``wrk_run``) measures every stack at c1 and c16 with the short body, and at c16 with
overhead.py's 30 kB kvcache body, alternating stacks within each round; the table holds medians over rounds,
ratios to ``bare`` (overhead.py's ``_bare`` itself: uvicorn + httptools + uvloop + aiohttp, the floor of the
current stack), and the CPU time the stack's processes (all threads) spent per request at c16, which machine noise
moves less than req/s. Every stack, ``bare`` included, runs in a session of its own: with the kernel's autogroup
scheduling (on by default) a server in the load generator's session gets a smaller share of a busy CPU.

    python benchmarks/passthrough_stacks.py [--duration 4] [--rounds 3] [--matrix] [--stacks S+C ...] [--no-long]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

from overhead import (
    BODY,
    KV_BODY,
    Proc,
    Sample,
    _bare,
    _wait_http,
    add_run_options,
    free_port,
    group_cpu_s,
    start_nginx,
    wrk_run,
)

SERVERS = ("uvicorn", "granian-asgi", "granian-rsgi", "aiohttp-web")
CLIENTS = ("aiohttp", "httpx", "pyreqwest", "curl-cffi", "rnet")
DEFAULT_STACKS = (
    [f"{s}+aiohttp" for s in SERVERS]
    + [f"uvicorn+{c}" for c in CLIENTS[1:]]
    + ["granian-rsgi+pyreqwest", "granian-asgi+pyreqwest"]
)
# the distribution that has to be installed for each server / client
PACKAGES = {
    "uvicorn": ("uvicorn", "httptools", "uvloop"),
    "granian-asgi": ("granian", "uvloop"),
    "granian-rsgi": ("granian", "uvloop"),
    "aiohttp-web": ("aiohttp", "uvloop"),
    "aiohttp": ("aiohttp",),
    "httpx": ("httpx",),
    "pyreqwest": ("pyreqwest",),
    "curl-cffi": ("curl_cffi",),
    "rnet": ("rnet",),
}
ENV_CLIENT, ENV_UPSTREAM = "PASSTHROUGH_CLIENT", "PASSTHROUGH_UPSTREAM"


# -- the pass-through: a client forwards into a server's response sink ------------------------------------------------
class Sink(Protocol):
    async def start(self, status: int, ctype: str | None, clen: str | None) -> None: ...
    async def write(self, chunk: bytes) -> None: ...


Forward = Callable[[str, str, bytes, "str | None", Sink], Awaitable[None]]


def make_client(name: str) -> Forward:
    """One shared client (keep-alive, no per-host cap); called inside the server's running event loop."""
    if name == "aiohttp":
        import aiohttp

        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, limit_per_host=0))

        async def fwd_aiohttp(method: str, url: str, body: bytes, ctype: str | None, sink: Sink) -> None:
            hdrs = {"content-type": ctype} if ctype else None
            async with session.request(method, url, data=body, headers=hdrs) as r:
                await sink.start(r.status, r.headers.get("content-type"), r.headers.get("content-length"))
                async for chunk in r.content.iter_any():
                    await sink.write(chunk)

        return fwd_aiohttp
    if name == "httpx":
        import httpx

        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        client = httpx.AsyncClient(limits=limits, http1=True, http2=False, trust_env=False)

        async def fwd_httpx(method: str, url: str, body: bytes, ctype: str | None, sink: Sink) -> None:
            hdrs = {"content-type": ctype} if ctype else None
            r = await client.send(client.build_request(method, url, content=body, headers=hdrs), stream=True)
            try:
                await sink.start(r.status_code, r.headers.get("content-type"), r.headers.get("content-length"))
                async for chunk in r.aiter_raw():
                    await sink.write(chunk)
            finally:
                await r.aclose()

        return fwd_httpx
    if name == "pyreqwest":
        from pyreqwest.client import ClientBuilder  # type: ignore[import-not-found,unused-ignore]

        rq = ClientBuilder().max_connections(None).http1_only().no_proxy().build()  # idle pool: unbounded

        async def fwd_pyreqwest(method: str, url: str, body: bytes, ctype: str | None, sink: Sink) -> None:
            # read-ahead 0: the answer's head is returned when it arrives (the default waits for 64 kB or the end
            # of the body, which holds an event stream's first events back)
            b = rq.request(method, url).body_bytes(body).streamed_read_buffer_limit(0)
            if ctype:
                b = b.header("content-type", ctype)
            async with b.build_streamed() as r:
                await sink.start(r.status, r.get_header("content-type"), r.get_header("content-length"))
                reader = r.body_reader
                while (chunk := await reader.read_chunk()) is not None:
                    await sink.write(chunk.to_bytes())

        return fwd_pyreqwest
    if name == "curl-cffi":
        from curl_cffi.requests import AsyncSession  # type: ignore[import-not-found,unused-ignore]

        cs: Any = AsyncSession(max_clients=1024)  # curl handles; libcurl has no per-host cap by default

        async def fwd_curl(method: str, url: str, body: bytes, ctype: str | None, sink: Sink) -> None:
            hdrs = {"content-type": ctype} if ctype else None
            r = await cs.request(method, url, data=body, headers=hdrs, stream=True, allow_redirects=False)
            try:
                await sink.start(r.status_code, r.headers.get("content-type"), r.headers.get("content-length"))
                async for chunk in r.aiter_content():
                    await sink.write(chunk)
            finally:
                await r.aclose()

        return fwd_curl
    if name == "rnet":
        import rnet  # type: ignore[import-not-found,unused-ignore]

        rc = rnet.Client(http1_only=True, no_proxy=True, allow_redirects=False)  # pool: unbounded by default

        async def fwd_rnet(method: str, url: str, body: bytes, ctype: str | None, sink: Sink) -> None:
            hdrs = {"content-type": ctype} if ctype else {}
            r = await rc.request(getattr(rnet.Method, method), url, body=body, headers=hdrs)
            async with r:
                ct, cl = r.headers.get("content-type"), r.headers.get("content-length")
                await sink.start(r.status, ct.decode() if ct else None, cl.decode() if cl else None)
                async with r.stream() as st:
                    async for chunk in st:
                        await sink.write(chunk)

        return fwd_rnet
    raise SystemExit(f"unknown client {name!r}")


class _Lazy:
    """The process's one client, made on first use inside the server's loop (granian imports the app first)."""

    fwd: Forward | None = None

    @classmethod
    def get(cls) -> Forward:
        if cls.fwd is None:
            cls.fwd = make_client(os.environ[ENV_CLIENT])
        return cls.fwd


UPSTREAM = os.environ.get(ENV_UPSTREAM, "")


# -- servers -----------------------------------------------------------------------------------------------------------
class AsgiSink:
    __slots__ = ("send",)

    def __init__(self, send: Any) -> None:
        self.send = send

    async def start(self, status: int, ctype: str | None, clen: str | None) -> None:
        hdrs = [(b"content-type", ctype.encode())] if ctype else []
        if clen is not None:
            hdrs.append((b"content-length", clen.encode()))
        await self.send({"type": "http.response.start", "status": status, "headers": hdrs})

    async def write(self, chunk: bytes) -> None:
        await self.send({"type": "http.response.body", "body": chunk, "more_body": True})


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The ASGI pass-through (uvicorn and granian-asgi)."""
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            await send({"type": msg["type"] + ".complete"})
            if msg["type"] == "lifespan.shutdown":
                return
    body, more = b"", True
    while more:
        msg = await receive()
        body += msg.get("body", b"")
        more = msg.get("more_body", False)
    ctype = next((v.decode() for k, v in scope["headers"] if k == b"content-type"), None)
    qs = scope.get("query_string", b"")
    path = scope["path"] + ("?" + qs.decode() if qs else "")
    await _Lazy.get()(scope["method"], UPSTREAM + path, body, ctype, AsgiSink(send))
    await send({"type": "http.response.body", "body": b""})


class RsgiSink:
    __slots__ = ("proto", "transport")

    def __init__(self, proto: Any) -> None:
        self.proto = proto
        self.transport: Any = None

    async def start(self, status: int, ctype: str | None, clen: str | None) -> None:
        hdrs = [("content-type", ctype)] if ctype else []
        if clen is not None:
            hdrs.append(("content-length", clen))
        self.transport = self.proto.response_stream(status, hdrs)

    async def write(self, chunk: bytes) -> None:
        await self.transport.send_bytes(chunk)


class RsgiApp:
    """The RSGI pass-through (granian-rsgi)."""

    async def __rsgi__(self, scope: Any, proto: Any) -> None:
        body = await proto()
        qs = scope.query_string
        path = scope.path + ("?" + qs if qs else "")
        await _Lazy.get()(scope.method, UPSTREAM + path, body, scope.headers.get("content-type"), RsgiSink(proto))


rsgi_app = RsgiApp()


def serve(server: str, client: str, upstream: str, port: int) -> None:
    os.environ[ENV_CLIENT], os.environ[ENV_UPSTREAM] = client, upstream
    global UPSTREAM
    UPSTREAM = upstream
    if server == "uvicorn":
        import uvicorn
        import uvloop

        cfg = uvicorn.Config(
            asgi_app,
            host="127.0.0.1",
            port=port,
            http="httptools",
            loop="none",
            lifespan="off",
            access_log=False,
            log_level="error",
        )
        uvloop.run(uvicorn.Server(cfg).serve())
    elif server.startswith("granian-"):
        from granian import Granian
        from granian.constants import HTTPModes, Interfaces, Loops
        from granian.log import LogLevels

        rsgi = server == "granian-rsgi"
        Granian(
            f"passthrough_stacks:{'rsgi_app' if rsgi else 'asgi_app'}",
            address="127.0.0.1",
            port=port,
            interface=Interfaces.RSGI if rsgi else Interfaces.ASGI,
            workers=1,
            loop=Loops.uvloop,
            http=HTTPModes.http1,
            websockets=False,
            log_level=LogLevels.error,
            working_dir=Path(__file__).resolve().parent,
        ).serve()
    elif server == "aiohttp-web":
        import uvloop
        from aiohttp import web

        async def handler(request: web.BaseRequest) -> web.StreamResponse:
            body = await request.read()
            out = web.StreamResponse()

            class WebSink:
                async def start(self, status: int, ctype: str | None, clen: str | None) -> None:
                    out.set_status(status)
                    if ctype:
                        out.headers["content-type"] = ctype
                    if clen is not None:
                        out.content_length = int(clen)
                    await out.prepare(request)

                async def write(self, chunk: bytes) -> None:
                    await out.write(chunk)

            await _Lazy.get()(
                request.method,
                upstream + request.path_qs,
                body,
                request.headers.get("content-type"),
                WebSink(),
            )
            await out.write_eof()
            return out

        async def main() -> None:
            runner = web.ServerRunner(web.Server(handler, access_log=None))
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            await asyncio.Event().wait()

        uvloop.run(main())
    else:
        raise SystemExit(f"unknown server {server!r}")


# -- verification upstream: echoes what arrived, answers big and chunked bodies ---------------------------------------
class _Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        info = echo_info(self.command, self.path, self.headers.get("content-type"), body)
        if self.path.startswith("/chunked"):
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            for i, part in enumerate(chunked_parts(info)):
                if i == 1:
                    time.sleep(STREAM_PAUSE_S)  # the first event must reach the client before this pause ends
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            return
        out = info + (body * 8 if self.path.startswith("/big") else b"")
        self.send_response(201)
        self.send_header("content-type", "application/x-echo")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST = do_PUT = _answer


def echo_info(method: str, path: str, ctype: str | None, body: bytes) -> bytes:
    d = {"method": method, "path": path, "ctype": ctype, "sha": hashlib.sha256(body).hexdigest(), "len": len(body)}
    return json.dumps(d).encode() + b"\n"


STREAM_PAUSE_S = 0.5


def chunked_parts(info: bytes) -> list[bytes]:
    return [b"data: " + info, *(b"data: %d\n\n" % i for i in range(5))]


def _fetch(url: str, method: str, body: bytes | None, ctype: str | None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers={"content-type": ctype} if ctype else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def first_event_delay(url: str, body: bytes) -> float:
    """Seconds from sending the request to reading the first event of the echo upstream's chunked answer."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname or "", u.port, timeout=10)
    try:
        t0 = time.perf_counter()
        conn.request("POST", u.path, body, {"content-type": "application/json"})
        r = conn.getresponse()
        r.readline()
        delay = time.perf_counter() - t0
        r.read()  # the rest, so that the upstream is not cut off mid-answer
        return delay
    finally:
        conn.close()


def verify(name: str, url: str, upstream: str, echo: bool) -> None:
    """Fail loudly unless the pass-through at ``url`` answers exactly what ``upstream`` answers."""
    cases: list[tuple[str, str, bytes, str | None]]
    if echo:
        cases = [
            ("POST", "/v1/completions?x=1&y=%20", KV_BODY, "application/json"),
            ("PUT", "/big/path", BODY, "text/plain; charset=utf-8"),
            ("POST", "/chunked", BODY, "application/json"),
        ]
    else:
        cases = [("POST", "/v1/completions", BODY, "application/json"), ("POST", "/tokenize", KV_BODY, None)]
    for method, path, body, ctype in cases:
        want = _fetch(upstream + path, method, body, ctype)
        got = _fetch(url + path, method, body, ctype)
        problems = []
        if got[0] != want[0]:
            problems.append(f"status {got[0]} != {want[0]}")
        if got[2] != want[2]:
            problems.append(f"body ({len(got[2])} bytes) != upstream's ({len(want[2])} bytes): {got[2][:200]!r}")
        for h in ("content-type", "content-length"):
            if got[1].get(h) != want[1].get(h):
                problems.append(f"{h} {got[1].get(h)!r} != {want[1].get(h)!r}")
        if echo:
            info = echo_info(method, path, ctype, body)
            if info not in got[2][:1000]:
                problems.append(f"upstream saw {got[2][:200]!r}, sent {info!r}")
        if path.startswith("/chunked") and (delay := first_event_delay(url + path, body)) > STREAM_PAUSE_S / 2:
            problems.append(f"not streamed: the first event arrived after {delay:.2f}s (upstream sent it at once)")
        if problems:
            raise SystemExit(f"{name}: {method} {path} is not passed through: " + "; ".join(problems))


class EchoUpstream:
    def __init__(self) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# -- stacks ------------------------------------------------------------------------------------------------------------
def missing(stack: str) -> str | None:
    server, client = stack.split("+")
    for dist in (*PACKAGES[server], *PACKAGES[client]):
        try:
            metadata.version(dist)
        except metadata.PackageNotFoundError:
            return dist
    return None


class _PortFile:
    """Where overhead.py's ``_bare`` puts the port it bound (it expects a queue)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def put(self, port: int) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(str(port))
        tmp.replace(self.path)


def start_stack(stack: str, upstream: str) -> Proc:
    """``SERVER+CLIENT``, or ``bare`` (overhead.py's ``_bare`` itself), in a process of its own session.

    Its own session: the kernel's autogroup scheduling (on by default) shares the CPU between sessions first, so a
    server in the load generator's session would get less of it than one in a session of its own."""
    server, _, client = stack.partition("+")
    port = free_port()
    d = Path(tempfile.mkdtemp(prefix=f"kvgate-passthrough-{server}-{client}-"))
    log = (d / "serve.log").open("wb")
    argv = [sys.executable, str(Path(__file__).resolve()), "--serve", server, "--upstream", upstream]
    argv += ["--port-file", str(d / "port")] if stack == "bare" else ["--client", client, "--port", str(port)]
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    proc = Proc(stack, f"http://127.0.0.1:{port}", popen=p, tmp=d)
    try:
        if stack == "bare":
            deadline = time.monotonic() + 30
            while not (d / "port").exists() and p.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            proc.url = f"http://127.0.0.1:{(d / 'port').read_text()}"
        _wait_http(proc.url + "/health", proc=p)
    except BaseException:
        print((d / "serve.log").read_text()[-2000:], file=sys.stderr)
        proc.stop()
        raise
    return proc


def log_tail(proc: Proc) -> str:
    f = proc.tmp / "serve.log" if proc.tmp else None
    return f.read_text()[-1500:] if f and f.exists() else ""


def cpu_s(proc: Proc) -> float:
    """CPU seconds (user + system, all threads) of a stack's process group (granian's workers included)."""
    assert proc.popen is not None
    return group_cpu_s(pgrp=proc.popen.pid)


@dataclass
class Result:
    samples: dict[str, list[Sample]]
    cpu_us: list[float]  # CPU µs per request at c16 (short body)


def versions() -> str:
    out = []
    for dist in ("uvicorn", "httptools", "uvloop", "granian", "aiohttp", "httpx", "pyreqwest", "curl_cffi", "rnet"):
        try:
            out.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            out.append(f"{dist} (not installed)")
    return f"Python {sys.version.split()[0]}; " + ", ".join(out)


# -- main ------------------------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(ap)
    ap.add_argument("--matrix", action="store_true", help="every server with every client")
    ap.add_argument("--stacks", nargs="*", help="only these SERVER+CLIENT stacks")
    ap.add_argument("--no-long", action="store_true", help="skip the c16 run with the 30 kB body")
    ap.add_argument("--serve", choices=(*SERVERS, "bare"), help=argparse.SUPPRESS)
    ap.add_argument("--port-file", help=argparse.SUPPRESS)
    ap.add_argument("--client", choices=CLIENTS, help=argparse.SUPPRESS)
    ap.add_argument("--upstream", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve == "bare":
        _bare(args.upstream, _PortFile(args.port_file))  # type: ignore[arg-type]  # a queue's put() is all it uses
        return 0
    if args.serve:
        serve(args.serve, args.client, args.upstream, args.port)
        return 0
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (apt-get install {tool}): this benchmark needs both")
    stacks = args.stacks or ([f"{s}+{c}" for s in SERVERS for c in CLIENTS] if args.matrix else DEFAULT_STACKS)
    for s in stacks:
        server, _, client = s.partition("+")
        if server not in SERVERS or client not in CLIENTS:
            raise SystemExit(f"unknown stack {s!r}: SERVER+CLIENT with SERVER in {SERVERS}, CLIENT in {CLIENTS}")
    print(versions(), flush=True)
    procs: list[Proc] = []
    echo = EchoUpstream()
    script_dir = Path(tempfile.mkdtemp(prefix="kvgate-passthrough-wrk-"))
    modes: list[tuple[str, bytes, int]] = [("c1", BODY, 1), ("c16", BODY, 16)]
    if not args.no_long:
        modes.append(("c16-long", KV_BODY, 16))
    try:
        up = start_nginx()
        procs.append(up)
        bare = start_stack("bare", up.url)  # overhead.py's floor: the current stack
        procs.append(bare)
        verify("bare", bare.url, up.url, echo=False)
        targets: dict[str, Proc] = {"direct": up, "bare": bare}
        for stack in stacks:
            if (dist := missing(stack)) is not None:
                print(f"note: {stack} skipped: {dist} is not installed", flush=True)
                continue
            for upstream, is_echo in ((echo.url, True), (up.url, False)):
                try:
                    p = start_stack(stack, upstream)
                except (OSError, RuntimeError) as e:  # it does not start here (its log is printed above)
                    print(f"note: {stack} skipped: it does not run here ({e})", flush=True)
                    break
                procs.append(p)
                try:
                    verify(stack, p.url, upstream, echo=is_echo)
                except SystemExit as e:
                    raise SystemExit(f"{e}\n{stack}'s log:\n{log_tail(p)}") from e
                if is_echo:
                    p.stop()
                    procs.remove(p)
            else:
                targets[stack] = p
        echo.close()
        print(
            f"measuring {len(targets)} paths x {len(modes)} loads x {args.rounds} rounds x {args.duration:g} s",
            flush=True,
        )
        for p in targets.values():  # warm-up
            wrk_run(p.url + "/v1/completions", BODY, 4, 1.0, script_dir)
        results = {n: Result({m: [] for m, _, _ in modes}, []) for n in targets}
        for r in range(args.rounds):
            for mode, body, conc in modes:
                order = list(targets) if r % 2 == 0 else list(reversed(targets))
                for name in order:
                    p = targets[name]
                    cpu0 = cpu_s(p)
                    s = wrk_run(p.url + "/v1/completions", body, conc, args.duration, script_dir)
                    if mode == "c16":
                        results[name].cpu_us.append((cpu_s(p) - cpu0) / (s.rps * args.duration) * 1e6)
                    results[name].samples[mode].append(s)
            print(f"round {r + 1}/{args.rounds} done", flush=True)
    finally:
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(script_dir, ignore_errors=True)
    print(report(results, args))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    n: {m: [s.__dict__ for s in v] for m, v in r.samples.items()} | {"cpu_us": r.cpu_us}
                    for n, r in results.items()
                }
            )
        )
    return 0


def _med(samples: list[Sample], attr: str) -> float:
    return float(statistics.median(getattr(s, attr) for s in samples))


def report(results: dict[str, Result], args: argparse.Namespace) -> str:
    long = not args.no_long
    lines = [
        f"load: wrk -t1; {args.rounds} rounds x {args.duration:g}s per path and load, alternating; medians over "
        f"rounds; ratios to bare (uvicorn+httptools+uvloop, aiohttp client); cpu = the stack's processes' CPU per "
        f"request at c16 (direct: nginx's); load average at end {os.getloadavg()[0]:.2f}",
        "",
        "| stack | c1 req/s | c1 p50 ms | c1 p99 ms | c16 req/s | c16 p50 ms | c16 p99 ms | cpu µs/req "
        + ("| c16 30 kB req/s " if long else "")
        + "| c1 req/s vs bare | c16 req/s vs bare | c16 p99 vs bare | cpu vs bare "
        + ("| c16 30 kB vs bare " if long else "")
        + "|",
        "|---" * (12 + 2 * long) + "|",
    ]
    b = results["bare"]
    for name, r in results.items():
        c1, c16 = r.samples["c1"], r.samples["c16"]
        cpu, bcpu = statistics.median(r.cpu_us), statistics.median(b.cpu_us)
        row = (
            f"| {name} | {_med(c1, 'rps'):.0f} | {_med(c1, 'p50_ms'):.3f} | {_med(c1, 'p99_ms'):.3f} "
            f"| {_med(c16, 'rps'):.0f} | {_med(c16, 'p50_ms'):.3f} | {_med(c16, 'p99_ms'):.3f} | {cpu:.0f} "
        )
        if long:
            row += f"| {_med(r.samples['c16-long'], 'rps'):.0f} "
        row += (
            f"| {_med(c1, 'rps') / _med(b.samples['c1'], 'rps'):.2f} "
            f"| {_med(c16, 'rps') / _med(b.samples['c16'], 'rps'):.2f} "
            f"| {_med(c16, 'p99_ms') / _med(b.samples['c16'], 'p99_ms'):.2f} | {cpu / bcpu:.2f} "
        )
        if long:
            row += f"| {_med(r.samples['c16-long'], 'rps') / _med(b.samples['c16-long'], 'rps'):.2f} "
        lines.append(row + "|")
    return "\n".join(lines)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sys.exit(main())
