"""``kvgate`` command line: serve, check-config, sim, bench, demo."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from kvgate import __version__
from kvgate.errors import ConfigError


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def cmd_serve(args: argparse.Namespace) -> int:
    from kvgate.app import serve_forever, start_gateway
    from kvgate.config import load_config

    _setup_logging(args.log_level)
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"kvgate: invalid config: {exc}", file=sys.stderr)
        return 2

    async def main() -> None:
        running = await start_gateway(cfg, host=args.host, port=args.port, admin_host=args.admin_host,
                                      admin_port=args.admin_port, log_level="warning",
                                      drain_timeout=args.drain_timeout)
        for h in running.listeners:
            print(f"kvgate {__version__}: listening on {h.url}", flush=True)
        if running.admin is not None:
            print(f"kvgate: admin on {running.admin.url} (/metrics /healthz /readyz /config)", flush=True)
        await serve_forever(running, args.drain_timeout)

    try:
        run_async(main())
    except ConfigError as exc:
        print(f"kvgate: invalid config: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"kvgate: cannot bind: {exc}", file=sys.stderr)
        return 1
    return 0


def run_async(coro):  # type: ignore[no-untyped-def]
    """Run a coroutine on uvloop when available (faster sockets), else the default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def cmd_check_config(args: argparse.Namespace) -> int:
    from kvgate.config import load_config
    from kvgate.server import Gateway

    try:
        cfg = load_config(args.file)
        gw = Gateway(cfg)  # builds and validates every filter config
    except ConfigError as exc:
        print(f"invalid: {exc}", file=sys.stderr)
        return 2
    for w in gw.warnings:
        print(f"warning: {w}")
    n_ep = sum(len(c.endpoints) for c in cfg.clusters)
    print(f"ok: {len(cfg.listeners)} listener(s), {len(cfg.clusters)} cluster(s), {n_ep} endpoint(s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvgate", description="KV-cache-aware OpenAI-compatible gateway for vLLM + LMCache"
    )
    p.add_argument("--version", action="version", version=f"kvgate {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the gateway")
    s.add_argument("-c", "--config", default=os.environ.get("KVGATE_CONFIG"),
                   required="KVGATE_CONFIG" not in os.environ, help="YAML config (Pixiu shape); env KVGATE_CONFIG")
    s.add_argument("--log-level", default=os.environ.get("KVGATE_LOG_LEVEL", "info"),
                   choices=["debug", "info", "warning", "error"], help="env KVGATE_LOG_LEVEL")
    s.add_argument("--host", default=os.environ.get("KVGATE_HOST"),
                   help="override the listener address (env KVGATE_HOST)")
    s.add_argument("--port", type=int, default=_env_int("KVGATE_PORT"), help="override the first listener port")
    s.add_argument("--admin-host", default=os.environ.get("KVGATE_ADMIN_HOST"), help="admin bind address")
    s.add_argument("--admin-port", type=int, default=_env_int("KVGATE_ADMIN_PORT"),
                   help="admin port (default from config, 9901; env KVGATE_ADMIN_PORT)")
    s.add_argument("--drain-timeout", type=float, default=10.0, help="seconds to drain in-flight requests on SIGTERM")
    s.set_defaults(fn=cmd_serve)

    c = sub.add_parser("check-config", help="validate a config file without serving")
    c.add_argument("file")
    c.set_defaults(fn=cmd_check_config)

    for name, module, help_ in (
        ("sim", "kvgate_sim.cli", "SIMULATOR: start a simulated vLLM + LMCache fleet on loopback (test/bench tool)"),
        ("bench", "kvgate_bench.cli", "benchmark routing modes on realistic workloads"),
        ("demo", "kvgate_bench.demo", "one-command demo: simulated fleet + gateway, round-robin vs kvcache"),
    ):
        sp = sub.add_parser(name, help=help_, add_help=False)
        sp.add_argument("rest", nargs=argparse.REMAINDER)
        sp.set_defaults(fn=_delegate(module, name))
    return p


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    return int(v) if v and v.isdigit() else None


def _delegate(module: str, name: str):  # type: ignore[no-untyped-def]
    def run(args: argparse.Namespace) -> int:
        import importlib

        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            print(f"kvgate {name}: not available ({exc})", file=sys.stderr)
            return 2
        return int(mod.main(args.rest, prog=f"kvgate {name}"))

    return run


DELEGATED = {"sim": "kvgate_sim.cli", "bench": "kvgate_bench.cli", "demo": "kvgate_bench.demo"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:  # sub-tools own their whole argument list (and --help)
        return int(_delegate(DELEGATED[argv[0]], argv[0])(argparse.Namespace(rest=argv[1:])))
    args = build_parser().parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
