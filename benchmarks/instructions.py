"""Instructions per request of the pass-through, counted by valgrind (callgrind): a measure the shared box's noise
does not move.

The req/s ratios of ``benchmarks/overhead.py`` swing by ±10% between runs here (other tenants, CPU steal); this
counts the user-space instructions each gateway process executes per request, which is deterministic to a few
tenths of a percent, and its ratios tracked the measured req/s ratios (bare / kvgate routing off: 0.61 by
instructions, 0.58-0.65 by req/s at ``bcbf918``). Each gateway runs under ``valgrind --tool=callgrind`` twice,
serving ``--n1`` and ``--n2`` sequential keep-alive requests from one client (after a warm-up); the difference of
the two totals over ``n2 - n1`` is the cost of one request, start-up and shutdown cancelled out. Kernel time
(system calls, loopback TCP) is not counted: one write fewer shows in req/s, not here.

    python benchmarks/instructions.py                       # bare (the floor) and this checkout's routing off
    python benchmarks/instructions.py --src base=/path/to/other/checkout   # and another tree, side by side

Needs ``valgrind`` and ``nginx`` (the zero-cost upstream of overhead.py). Each gateway takes ~1 minute.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead  # the same upstream, body and configs as the req/s benchmark

ROOT = Path(__file__).resolve().parent.parent

# The floor of overhead.py, as a program of its own: callgrind runs one program.
BARE = (
    "import sys; sys.path.insert(0, sys.argv[3]); import overhead; overhead.serve_bare(sys.argv[1], int(sys.argv[2]))"
)


def send_requests(url: str, n: int, body: bytes) -> None:
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        for _ in range(n):
            conn.request("POST", "/v1/completions", body=body, headers={"content-type": "application/json"})
            r = conn.getresponse()
            r.read()
            if r.status != 200:
                raise RuntimeError(f"{url}: status {r.status}")
    finally:
        conn.close()


def count(src: str | None, upstream: str, n: int, kvcache: bool) -> int:
    """Instructions of one gateway run serving ``n`` requests (after 20 warm-up ones); ``src=None``: the floor."""
    d = Path(tempfile.mkdtemp(prefix="kvgate-instructions-"))
    port = overhead.free_port()
    env = {**os.environ, "PYTHONHASHSEED": "0"}  # str/bytes hashes, and so dict and set layouts, alike in each run
    cwd = None
    body = overhead.KV_BODY if kvcache else overhead.BODY
    if src is None:
        argv = [sys.executable, "-c", BARE, upstream, str(port), str(Path(__file__).resolve().parent)]
        ready = f"http://127.0.0.1:{port}/health"
    else:
        up_port = int(upstream.rsplit(":", 1)[1])
        (d / "gw.yaml").write_text(yaml.safe_dump(overhead.kvgate_config(up_port, upstream, kvcache=kvcache)))
        admin = overhead.free_port()
        argv = [sys.executable, "-m", "kvgate.cli", "serve", "-c", str(d / "gw.yaml"), "--port", str(port),
                "--admin-port", str(admin), "--log-level", "warning"]  # fmt: skip
        env, cwd = {**env, "PYTHONPATH": src}, src  # run from the tree's root: `-m` puts it first
        ready = f"http://127.0.0.1:{admin}/readyz"
    err = d / "valgrind.log"
    with err.open("wb") as log:
        p = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={d}/callgrind.out", *argv],
            cwd=cwd,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
        )
    try:
        overhead._wait_http(ready, timeout=300, proc=p)
        url = f"http://127.0.0.1:{port}"
        send_requests(url, 20, body)
        send_requests(url, n, body)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGINT)
            p.wait(300)
    m = re.search(r"Collected : (\d+)", err.read_text())
    shutil.rmtree(d, ignore_errors=True)
    if m is None:
        raise RuntimeError("valgrind reported no instruction count")
    return int(m.group(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n1", type=int, default=100, help="requests in the shorter run")
    ap.add_argument("--n2", type=int, default=400, help="requests in the longer run")
    ap.add_argument("--src", action="append", default=[], help="NAME=PATH: also count kvgate from this tree")
    ap.add_argument("--kvcache", action="store_true", help="kvgate with the kvcache filter (long body, cache hit)")
    args = ap.parse_args()
    if shutil.which("valgrind") is None or shutil.which("nginx") is None:
        print("needs valgrind and nginx (apt-get install valgrind nginx)")
        return 1
    trees: dict[str, str | None] = {"bare": None, "kvgate": str(ROOT)}
    for item in args.src:
        name, _, path = item.partition("=")
        trees[name] = path
    up = overhead.start_nginx()
    try:
        per: dict[str, float] = {}
        for name, src in trees.items():
            kv = args.kvcache and src is not None
            per[name] = (count(src, up.url, args.n2, kv) - count(src, up.url, args.n1, kv)) / (args.n2 - args.n1)
            print(f"{name:12s} {per[name] / 1000:8.1f} k instructions/request", flush=True)
    finally:
        up.stop()
    print("\n| gateway | k instructions/request | bare / gateway |\n|---|---|---|")
    for name, v in per.items():
        print(f"| {name} | {v / 1000:.1f} | {per['bare'] / v:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
