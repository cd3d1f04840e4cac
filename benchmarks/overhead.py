"""Data-path overhead (issue 12): kvgate side by side with the Python floor and the Rust router, in ONE run.

Paths, all on loopback, all in front of the same zero-cost upstream (nginx answering static JSON when the
Debian package is installed, else a tiny uvicorn app, with a note):

* ``direct``: the load generator straight to the upstream;
* ``bare``: a bare Python pass-through (uvicorn + httptools + uvloop + aiohttp, ~30 lines below): the floor
  for this stack;
* ``kvgate-off``: ``kvgate serve`` with the proxy filter only (routing off);
* ``bare-long``: only when named in ``--paths``: ``bare`` sent the kvcache paths' long body;
* ``kvgate-kv``: ``kvgate serve`` with the kvcache filter on: a long prompt, token-cache hit on every
  measured request, a routing ``/lookup`` to a zero-cost controller (the same upstream);
* ``kvgate-off-long``: the ``kvgate-off`` gateway sent the kvcache paths' long body (the fair baseline for them);
* ``kvgate-local``: the kvcache filter with the recommended local routing (``local_tokenizer`` = the simulator's
  tokenizer directory, ``index_source: events``): a token-cache hit routed from the event index, which the
  benchmark fills by publishing the prompt's blocks as vLLM ``BlockStored`` events (no controller call);
* ``vllm-router``: when installed (optional peer, never a dependency), ``cache_aware`` policy;
* ``kvgate-off-w2``: with ``--workers-scaling``, ``kvgate serve --workers 2`` (routing off);
* ``kvgate-off-gc0``: only when named in ``--paths``: ``kvgate-off`` with ``--gc-threshold 0`` (the interpreter's
  collector settings: the A/B of kvgate/gctune.py).

Load generator: ``wrk -t1`` with a Lua script for the POST body when wrk is installed (it does not saturate a
core before the gateway does); otherwise an aiohttp client (noted in the output: it costs a core itself).
Every round runs every path at c1 and c16, alternating, so machine noise hits all paths alike; the table
holds medians over rounds and ratios to the floor (``bare``) and to ``vllm-router``, and each server's CPU time per
request at c16 (from /proc, its whole process session): req/s per core, which moves less with the box's load
than req/s does.

    python benchmarks/overhead.py [--duration 4] [--rounds 3] [--workers-scaling] [--no-peer] [--paths ...]
                                  [--baseline-src ../other-checkout]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

BODY = json.dumps({"model": "demo", "prompt": "hello", "max_tokens": 1}).encode()
# kvcache path: a long prompt (about 4k tokens of text) so routing has something to look up.
LONG_PROMPT = " ".join(f"word{i % 97} of a long shared system prompt." for i in range(700))
KV_BODY = json.dumps({"model": "demo", "prompt": LONG_PROMPT, "max_tokens": 1}).encode()
REPLY = json.dumps({"id": "cmpl-1", "object": "text_completion", "choices": [{"index": 0, "text": "ok"}]})
N_TOKENS = 4096
TOKENIZE_REPLY = json.dumps({"count": N_TOKENS, "max_model_len": 32768, "tokens": list(range(1, N_TOKENS + 1))})
LOOKUP_REPLY = json.dumps({"event_id": "e1", "layout_info": {"up": ["LocalCPUBackend", N_TOKENS]}})
CONCURRENCIES = (1, 16)


_TICK = os.sysconf("SC_CLK_TCK")


def group_cpu_s(*, session: int | None = None, pgrp: int | None = None) -> float:
    """CPU seconds (user + system, all threads) of every process in a session or a process group, from /proc."""
    field, want = (3, session) if session is not None else (2, pgrp)
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[field]) == want:  # after the name: state(0) ppid pgrp session ... utime(11) stime(12)
            total += int(fields[11]) + int(fields[12])
    return total / _TICK


def pid_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) of one process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- upstream ----------------------------------------------------------------------------------------------------------
NGINX_CONF = """
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 60s;
    client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;
    uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
    client_max_body_size 16m;
    default_type application/json;
    server {{
        listen 127.0.0.1:{port} reuseport;
        # POST to a static file: the 405 becomes a GET of the file (the token list is too long for `return`)
        location = /tokenize {{ error_page 405 =200 /tokenize.json; return 405; }}
        location = /tokenize.json {{ root {d}; }}
        location = /lookup {{ return 200 '{lookup}'; }}
        location / {{ return 200 '{reply}'; }}
    }}
}}
"""


@dataclass
class Proc:
    name: str
    url: str
    popen: subprocess.Popen[bytes] | None = None
    mp_proc: Any = None
    tmp: Path | None = None
    cleanup: list[Path] = field(default_factory=list)

    def cpu_s(self) -> float:
        """CPU seconds the server has used so far (a started program: its whole session, workers included)."""
        if self.popen is not None:
            return group_cpu_s(session=self.popen.pid)
        return pid_cpu_s(self.mp_proc.pid)

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        if self.mp_proc is not None:
            self.mp_proc.terminate()
            self.mp_proc.join(5)
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _wait_http(url: str, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"{url} not ready in {timeout}s")


def start_nginx() -> Proc:
    d = Path(tempfile.mkdtemp(prefix="kvgate-overhead-nginx-"))
    port = free_port()
    conf = d / "nginx.conf"
    (d / "tokenize.json").write_text(TOKENIZE_REPLY)
    d.chmod(0o755)  # nginx's worker process (another user when started as root) reads the file
    (d / "tokenize.json").chmod(0o644)
    conf.write_text(NGINX_CONF.format(d=d, port=port, reply=REPLY, lookup=LOOKUP_REPLY))
    p = subprocess.Popen(
        ["nginx", "-c", str(conf), "-p", str(d), "-e", str(d / "error.log")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    proc = Proc("nginx", f"http://127.0.0.1:{port}", popen=p, tmp=d)
    try:
        _wait_http(proc.url + "/health", proc=p)
    except BaseException:
        proc.stop()
        raise
    return proc


def _py_upstream(port_q: mp.Queue) -> None:  # type: ignore[type-arg]
    import uvloop

    from kvgate.asgi import Router, send_response
    from kvgate.serving import start_server

    router = Router()

    def const(body: bytes) -> Any:
        async def h(req, send):  # type: ignore[no-untyped-def]
            await req.body()
            await send_response(send, 200, body)

        return h

    router.add("POST", "/v1/completions", const(REPLY.encode()))
    router.add("POST", "/tokenize", const(TOKENIZE_REPLY.encode()))
    router.add("POST", "/lookup", const(LOOKUP_REPLY.encode()))
    for p in ("/health", "/v1/models"):
        router.add("GET", p, const(b"{}"))

    async def main() -> None:
        h = await start_server(router, log_level="error")
        port_q.put(h.port)
        await asyncio.Event().wait()

    uvloop.run(main())


def start_py_upstream(ctx: Any) -> Proc:
    q = ctx.Queue()
    p = ctx.Process(target=_py_upstream, args=(q,), daemon=True)
    p.start()
    return Proc("py-upstream", f"http://127.0.0.1:{q.get(timeout=30)}", mp_proc=p)


# -- the floor: a bare Python pass-through ---------------------------------------------------------------------------
def _bare(upstream: str, port_q: mp.Queue) -> None:  # type: ignore[type-arg]
    # A session of its own, like every `kvgate serve` here: with the kernel's autogroup scheduling on, a
    # process sharing wrk's session shares wrk's CPU share, which made the floor slower than kvgate's paths.
    os.setsid()
    serve_bare(upstream, 0, port_q.put)


def serve_bare(upstream: str, port: int = 0, on_port: Any = None) -> None:
    """The floor: serve the bare pass-through to ``upstream`` on ``127.0.0.1:port`` until killed; ``on_port``
    is called with the bound port (benchmarks/instructions.py runs this under valgrind)."""
    import uvicorn
    import uvloop

    session: aiohttp.ClientSession | None = None

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        body, more = b"", True
        while more:
            msg = await receive()
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
        hdrs = {k.decode(): v.decode() for k, v in scope["headers"] if k == b"content-type"}
        assert session is not None
        async with session.request(scope["method"], upstream + scope["path"], data=body, headers=hdrs) as r:
            out = [(b"content-type", r.headers.get("content-type", "").encode())]
            if "content-length" in r.headers:
                out.append((b"content-length", r.headers["content-length"].encode()))
            await send({"type": "http.response.start", "status": r.status, "headers": out})
            async for chunk in r.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async def main() -> None:
        nonlocal session
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", port))
        cfg = uvicorn.Config(app, http="httptools", loop="none", lifespan="off", access_log=False, log_level="error")
        server = uvicorn.Server(cfg)
        if on_port is not None:
            on_port(sock.getsockname()[1])
        await server.serve(sockets=[sock])

    uvloop.run(main())


def start_bare(ctx: Any, upstream: str) -> Proc:
    q = ctx.Queue()
    p = ctx.Process(target=_bare, args=(upstream, q), daemon=True)
    p.start()
    proc = Proc("bare", f"http://127.0.0.1:{q.get(timeout=30)}", mp_proc=p)
    _wait_http(proc.url + "/health")
    return proc


# -- kvgate ----------------------------------------------------------------------------------------------------------
def local_routing_keys(events_port: int) -> dict[str, Any]:
    """The recommended local-routing keys: the simulator's tokenizer files and an event index for endpoint ``up``."""
    from kvgate_sim.tokenizer import tokenizer_dir

    return {
        "local_tokenizer": {"path": str(tokenizer_dir())},
        "index_source": "events",
        "kv_events": {"bind": f"tcp://127.0.0.1:{events_port}", "sources": [{"instance": "up", "topic": "kv.up"}]},
    }


def publish_prompt_blocks(events_port: int, prompt: str, block_size: int = 16, seconds: float = 2.0) -> None:
    """Tell the gateway's event index that endpoint ``up`` holds every full block of ``prompt`` (as vLLM would)."""
    import zmq

    from kvgate.kvevents.wire import BlockStored, KVEventBatch, encode_message
    from kvgate.tokenization import LocalTokenizer
    from kvgate_sim.tokenizer import tokenizer_dir

    ids = LocalTokenizer.from_dir(tokenizer_dir()).encode_prompt(prompt)
    n = len(ids) // block_size * block_size
    event = BlockStored(list(range(1, n // block_size + 1)), None, ids[:n], block_size, medium="GPU")
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    try:
        pub.connect(f"tcp://127.0.0.1:{events_port}")
        deadline = time.monotonic() + seconds
        seq = 0
        while time.monotonic() < deadline:  # PUB drops what it sends before the subscription arrives: resend
            pub.send_multipart(encode_message(b"kv.up", seq, KVEventBatch(time.time(), [event])))  # idempotent
            seq += 1
            time.sleep(0.1)
    finally:
        pub.close(linger=500)
        ctx.term()


def kvgate_config(up_port: int, upstream: str, kvcache: bool, local: dict[str, Any] | None = None) -> dict[str, Any]:
    filters: list[dict[str, Any]] = []
    if kvcache:
        filters.append(
            {
                "name": "dgp.filter.ai.kvcache",
                "config": {
                    "enabled": True,
                    "vllm_endpoint": upstream,
                    "lmcache_endpoint": upstream,
                    "default_model": "demo",
                    "request_timeout": "2s",
                    "lookup_routing_timeout": "100ms",
                    "token_cache": {"enabled": True, "max_size": 1024, "ttl": "10m"},
                    "tokenize_on_miss": True,  # the first request fills the token cache; the measured ones hit it
                    **(local or {}),
                },
            }
        )
    filters.append({"name": "dgp.filter.llm.proxy", "config": {}})
    hcm = {"route_config": {"routes": [{"match": {"prefix": "/"}, "route": {"cluster": "c"}}]}, "http_filters": filters}
    return {
        "listeners": [
            {
                "name": "bench",
                "address": {"socket_address": {"address": "127.0.0.1", "port": 1}},
                "filter_chains": {"filters": [{"name": "dgp.filter.httpconnectionmanager", "config": hcm}]},
            }
        ],
        "clusters": [
            {
                "name": "c",
                "lb_policy": "RoundRobin",
                "endpoints": [{"id": "up", "socket_address": {"address": "127.0.0.1", "port": up_port}}],
            }
        ],
    }


def start_kvgate(
    name: str, config: dict[str, Any], workers: int = 1, src: str | None = None, extra: list[str] | None = None
) -> Proc:
    d = Path(tempfile.mkdtemp(prefix=f"kvgate-overhead-{name}-"))
    cfg = d / "gw.yaml"
    cfg.write_text(yaml.safe_dump(config))
    port, admin = free_port(), free_port()
    argv = [sys.executable, "-m", "kvgate.cli", "serve", "-c", str(cfg), "--port", str(port),
            "--admin-port", str(admin), "--log-level", "warning"]  # fmt: skip
    if workers > 1:
        argv += ["--workers", str(workers)]
    argv += extra or []
    log = (d / "serve.log").open("wb")
    # another checkout's kvgate package (A/B); run from its root: `python -m` puts the working directory first on
    # sys.path, ahead of PYTHONPATH, so started from this checkout it would import this checkout's kvgate
    env = {**os.environ, "PYTHONPATH": src} if src else None
    p = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=src
    )
    log.close()
    proc = Proc(name, f"http://127.0.0.1:{port}", popen=p, tmp=d)
    try:
        _wait_http(f"http://127.0.0.1:{admin}/readyz", proc=p)
    except BaseException:
        print((d / "serve.log").read_text()[-2000:], file=sys.stderr)
        proc.stop()
        raise
    return proc


def start_vllm_router(upstream: str) -> Proc | None:
    binary = shutil.which("vllm-router") or str(Path(sys.executable).parent / "vllm-router")
    if not Path(binary).exists():
        return None
    port, mport = free_port(), free_port()
    d = Path(tempfile.mkdtemp(prefix="kvgate-overhead-vllm-router-"))
    argv = [binary, "--host", "127.0.0.1", "--port", str(port), "--worker-urls", upstream,
            "--policy", "cache_aware", "--prometheus-host", "127.0.0.1", "--prometheus-port", str(mport)]  # fmt: skip
    log = (d / "router.log").open("wb")
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    proc = Proc("vllm-router", f"http://127.0.0.1:{port}", popen=p, tmp=d)
    try:
        _wait_http(proc.url + "/health", timeout=60, proc=p)
    except BaseException:
        print((d / "router.log").read_text()[-2000:], file=sys.stderr)
        proc.stop()
        raise
    return proc


# -- load ------------------------------------------------------------------------------------------------------------
@dataclass
class Sample:
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us: float = 0.0  # the server's CPU time per request (its req/s per core is 1e6 / cpu_us)


_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text.strip())
    if m is None:
        raise ValueError(f"wrk latency {text!r}")
    return float(m.group(1)) * _UNIT[m.group(2)]


def wrk_run(url: str, body: bytes, conc: int, duration: float, script_dir: Path) -> Sample:
    script = script_dir / f"post-{len(body)}.lua"
    if not script.exists():
        sep = "=" * 4
        script.write_text(
            f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
            f"wrk.body = [{sep}[{body.decode()}]{sep}]\n"
            "function response(status, headers, body)\n"
            '  if status ~= 200 then print("status " .. status) end\nend\n'
        )
    out = subprocess.run(
        ["wrk", "-t1", f"-c{conc}", f"-d{duration:g}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if "status " in out or "Non-2xx" in out:
        raise RuntimeError(f"non-200 answers from {url}:\n{out}")
    rps = float(re.search(r"Requests/sec:\s*([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    return Sample(rps, p50, p99)


async def _aio_load(url: str, body: bytes, conc: int, duration: float) -> Sample:
    lat: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conc)) as s:
        stop = time.perf_counter() + duration

        async def worker() -> None:
            while time.perf_counter() < stop:
                t = time.perf_counter()
                async with s.post(url, data=body, headers={"content-type": "application/json"}) as r:
                    await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"{url}: {r.status}")
                lat.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conc)))
        wall = time.perf_counter() - t0
    lat.sort()
    return Sample(len(lat) / wall, lat[len(lat) // 2] * 1e3, lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1e3)


def load(url: str, body: bytes, conc: int, duration: float, script_dir: Path, use_wrk: bool) -> Sample:
    if use_wrk:
        return wrk_run(url, body, conc, duration, script_dir)
    return asyncio.run(_aio_load(url, body, conc, duration))


# -- main ------------------------------------------------------------------------------------------------------------
def add_run_options(ap: argparse.ArgumentParser) -> None:
    """The options every data-path benchmark here shares: measurement length, rounds, JSON output."""
    ap.add_argument("--duration", type=float, default=4.0, help="seconds per measurement")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", help="also write the results as JSON to this file")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(ap)
    ap.add_argument("--no-peer", action="store_true", help="skip vllm-router even when installed")
    ap.add_argument("--workers-scaling", action="store_true", help="also measure kvgate serve --workers 2")
    ap.add_argument("--paths", nargs="*", help="only these paths (direct and bare always run)")
    ap.add_argument(
        "--baseline-src",
        help="A/B in the same run: also measure kvgate-off and kvgate-kv from this source tree (a checkout's root, "
        "put first on PYTHONPATH), shown as kvgate-off@base and kvgate-kv@base",
    )
    args = ap.parse_args()
    use_wrk = shutil.which("wrk") is not None
    ctx = mp.get_context("spawn")
    procs: list[Proc] = []
    script_dir = Path(tempfile.mkdtemp(prefix="kvgate-overhead-wrk-"))
    try:
        if shutil.which("nginx"):
            up = start_nginx()
        else:
            print("note: nginx not installed: the upstream is a small uvicorn app (not zero-cost)")
            up = start_py_upstream(ctx)
        procs.append(up)
        up_port = int(up.url.rsplit(":", 1)[1])
        targets: dict[str, tuple[Proc, bytes]] = {"direct": (up, BODY)}
        bare = start_bare(ctx, up.url)
        procs.append(bare)
        targets["bare"] = (bare, BODY)
        want = set(args.paths or ["kvgate-off", "kvgate-kv", "kvgate-local", "vllm-router", "kvgate-off-w2"])
        if "bare-long" in want:
            targets["bare-long"] = (bare, KV_BODY)
        if "kvgate-off" in want:
            p = start_kvgate("kvgate-off", kvgate_config(up_port, up.url, kvcache=False))
            procs.append(p)
            targets["kvgate-off"] = (p, BODY)
            if want & {"kvgate-local", "kvgate-kv", "kvgate-off-long"}:  # the same gateway, the long body
                targets["kvgate-off-long"] = (p, KV_BODY)
        if "kvgate-kv" in want:
            p = start_kvgate("kvgate-kv", kvgate_config(up_port, up.url, kvcache=True))
            procs.append(p)
            targets["kvgate-kv"] = (p, KV_BODY)
        if "kvgate-local" in want:
            ev_port = free_port()
            p = start_kvgate("kvgate-local", kvgate_config(up_port, up.url, True, local_routing_keys(ev_port)))
            procs.append(p)
            publish_prompt_blocks(ev_port, LONG_PROMPT)
            targets["kvgate-local"] = (p, KV_BODY)
        if args.baseline_src:
            for name, kv, body in (("kvgate-off", False, BODY), ("kvgate-kv", True, KV_BODY)):
                if name in want:
                    p = start_kvgate(name + "@base", kvgate_config(up_port, up.url, kvcache=kv), src=args.baseline_src)
                    procs.append(p)
                    targets[name + "@base"] = (p, body)
        if "kvgate-off-gc0" in want and args.paths:
            p = start_kvgate(
                "kvgate-off-gc0", kvgate_config(up_port, up.url, kvcache=False), extra=["--gc-threshold", "0"]
            )
            procs.append(p)
            targets["kvgate-off-gc0"] = (p, BODY)
        if args.workers_scaling and "kvgate-off-w2" in want:
            p = start_kvgate("kvgate-off-w2", kvgate_config(up_port, up.url, kvcache=False), workers=2)
            procs.append(p)
            targets["kvgate-off-w2"] = (p, BODY)
        if not args.no_peer and "vllm-router" in want:
            peer = start_vllm_router(up.url)
            if peer is None:
                print("note: vllm-router not installed: peer comparison skipped (pip install vllm-router)")
            else:
                procs.append(peer)
                targets["vllm-router"] = (peer, BODY)
        # warm-up (kvcache: the first request fills the token cache; later ones hit it)
        for _name, (proc, body) in targets.items():
            load(proc.url + "/v1/completions", body, 4, 1.0, script_dir, use_wrk)
        results: dict[str, dict[int, list[Sample]]] = {n: {c: [] for c in CONCURRENCIES} for n in targets}
        for r in range(args.rounds):
            for conc in CONCURRENCIES:
                order = list(targets) if r % 2 == 0 else list(reversed(targets))
                for name in order:
                    proc, body = targets[name]
                    cpu = proc.cpu_s()
                    sample = load(proc.url + "/v1/completions", body, conc, args.duration, script_dir, use_wrk)
                    sample.cpu_us = (proc.cpu_s() - cpu) / (sample.rps * args.duration) * 1e6
                    results[name][conc].append(sample)
    finally:
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(script_dir, ignore_errors=True)
    print(report(results, use_wrk, args))
    if args.json:
        Path(args.json).write_text(
            json.dumps({n: {str(c): [s.__dict__ for s in v] for c, v in d.items()} for n, d in results.items()})
        )
    return 0


def _med(samples: list[Sample], attr: str) -> float:
    return statistics.median(getattr(s, attr) for s in samples)


def report(results: dict[str, dict[int, list[Sample]]], use_wrk: bool, args: argparse.Namespace) -> str:
    gen = "wrk -t1" if use_wrk else "aiohttp client (wrk not installed: the client costs a core itself)"
    lines = [
        f"load: {gen}; {args.rounds} rounds x {args.duration:g}s per path and concurrency, alternating; "
        f"medians over rounds; load average at end {os.getloadavg()[0]:.2f}",
        "",
        "| path | c1 req/s | c1 p50 ms | c1 p99 ms | c16 req/s | c16 p50 ms | c16 p99 ms "
        "| c16 req/s vs bare | c16 p99 vs bare | c16 req/s vs vllm-router | c16 CPU µs/req "
        "| c16 req/s per core vs bare |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    floor = results["bare"]
    peer = results.get("vllm-router")
    for name, by_c in results.items():
        c1, c16 = by_c[1], by_c[16]
        vs_peer = f"{_med(c16, 'rps') / _med(peer[16], 'rps'):.2f}" if peer else "-"
        lines.append(
            f"| {name} | {_med(c1, 'rps'):.0f} | {_med(c1, 'p50_ms'):.3f} | {_med(c1, 'p99_ms'):.3f} "
            f"| {_med(c16, 'rps'):.0f} | {_med(c16, 'p50_ms'):.3f} | {_med(c16, 'p99_ms'):.3f} "
            f"| {_med(c16, 'rps') / _med(floor[16], 'rps'):.2f} "
            f"| {_med(c16, 'p99_ms') / _med(floor[16], 'p99_ms'):.2f} "
            f"| {vs_peer} | {_med(c16, 'cpu_us'):.0f} | {_med(floor[16], 'cpu_us') / _med(c16, 'cpu_us'):.2f} |"
        )
    off = results.get("kvgate-off")
    if off:
        direct = results["direct"]
        lines += [
            "",
            "acceptance (issue 12):",
            f"- routing off c16 req/s vs bare: {_med(off[16], 'rps') / _med(floor[16], 'rps'):.2f} (target >= 0.85)",
            f"- routing off c1 added p50 over direct: {_med(off[1], 'p50_ms') - _med(direct[1], 'p50_ms'):.3f} ms "
            "(target <= 0.35)",
            f"- routing off c16 p99 vs bare: {_med(off[16], 'p99_ms') / _med(floor[16], 'p99_ms'):.2f} (target <= 2)",
            f"- routing off c16 req/s per core (CPU time per request) vs bare: "
            f"{_med(floor[16], 'cpu_us') / _med(off[16], 'cpu_us'):.2f}",
        ]
        kv = results.get("kvgate-kv")
        if kv:
            lines.append(
                f"- kvcache on c16 req/s vs routing off: {_med(kv[16], 'rps') / _med(off[16], 'rps'):.2f} "
                "(target >= 0.70)"
            )
        local = results.get("kvgate-local")
        off_long = results.get("kvgate-off-long")
        if local:
            lines.append(
                f"- local routing c16 req/s vs routing off: {_med(local[16], 'rps') / _med(off[16], 'rps'):.2f} "
                "(short body for routing off)"
            )
        if local and off_long:
            lines.append(
                "- local routing c16 req/s vs routing off with the same long body: "
                f"{_med(local[16], 'rps') / _med(off_long[16], 'rps'):.2f} (issue 9 target >= 0.85)"
            )
        w2 = results.get("kvgate-off-w2")
        if w2:
            lines.append(
                f"- 2 workers vs 1 (routing off): c16 req/s x{_med(w2[16], 'rps') / _med(off[16], 'rps'):.2f}, "
                f"c1 req/s x{_med(w2[1], 'rps') / _med(off[1], 'rps'):.2f}"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
