"""``kvgate`` command line: serve, check-config, and the tool commands (sim, bench, demo, real) found through the
``kvgate.commands`` entry-point group."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import cast

from kvgate import __version__
from kvgate.errors import ConfigError
from kvgate.gctune import DEFAULT_GEN0_THRESHOLD, tune_for_serving
from kvgate.serving import run_async, setup_logging


def cmd_serve(args: argparse.Namespace) -> int:
    from kvgate.app import serve_forever, start_gateway
    from kvgate.config import load_config

    setup_logging(args.log_level)
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"kvgate: invalid config: {exc}", file=sys.stderr)
        return 2
    if args.workers > 1:
        from kvgate.workers import serve_workers

        return serve_workers(
            cfg,
            config_path=args.config,
            workers=args.workers,
            host=args.host,
            port=args.port,
            admin_host=args.admin_host,
            admin_port=args.admin_port,
            log_level=args.log_level,
            drain_timeout=args.drain_timeout,
            gc_threshold=args.gc_threshold,
        )

    async def main() -> None:
        running = await start_gateway(
            cfg,
            host=args.host,
            port=args.port,
            admin_host=args.admin_host,
            admin_port=args.admin_port,
            log_level="warning",
            drain_timeout=args.drain_timeout,
        )
        tune_for_serving(args.gc_threshold)
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


def cmd_check_config(args: argparse.Namespace) -> int:
    from kvgate.config import load_config
    from kvgate.registry import check_config

    try:
        cfg = load_config(args.file)
        checked = check_config(cfg)  # every filter config and the terminal filter; no runtime is built
    except ConfigError as exc:
        print(f"invalid: {exc}", file=sys.stderr)
        return 2
    for w in checked.warnings:
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
    s.add_argument(
        "-c",
        "--config",
        default=os.environ.get("KVGATE_CONFIG"),
        required="KVGATE_CONFIG" not in os.environ,
        help="YAML config (Pixiu shape); env KVGATE_CONFIG",
    )
    s.add_argument(
        "--log-level",
        default=os.environ.get("KVGATE_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        help="env KVGATE_LOG_LEVEL",
    )
    s.add_argument(
        "--host", default=os.environ.get("KVGATE_HOST"), help="override the listener address (env KVGATE_HOST)"
    )
    s.add_argument("--port", type=int, default=_env_int("KVGATE_PORT"), help="override the first listener port")
    s.add_argument("--admin-host", default=os.environ.get("KVGATE_ADMIN_HOST"), help="admin bind address")
    s.add_argument(
        "--admin-port",
        type=int,
        default=_env_int("KVGATE_ADMIN_PORT"),
        help="admin port (default from config, 9901; env KVGATE_ADMIN_PORT)",
    )
    s.add_argument("--drain-timeout", type=float, default=10.0, help="seconds to drain in-flight requests on SIGTERM")
    s.add_argument(
        "--gc-threshold",
        type=_non_negative_int,
        default=DEFAULT_GEN0_THRESHOLD,
        help="after startup freeze the heap and set the first GC threshold to this (fewer, shorter collection "
        f"pauses: see kvgate/gctune.py); 0 keeps the interpreter's GC settings (default {DEFAULT_GEN0_THRESHOLD})",
    )
    s.add_argument(
        "--workers",
        type=_positive_int,
        default=_env_int("KVGATE_WORKERS") or 1,
        help="worker processes sharing the ports (SO_REUSEPORT), each with its own caches and breakers; "
        "metrics are summed over workers (env KVGATE_WORKERS; default 1)",
    )
    s.set_defaults(fn=cmd_serve)

    c = sub.add_parser("check-config", help="validate a config file without serving")
    c.add_argument("file")
    c.set_defaults(fn=cmd_check_config)

    for name, help_ in _tool_commands().items():
        sp = sub.add_parser(name, help=help_, add_help=False)
        sp.add_argument("rest", nargs=argparse.REMAINDER)
        sp.set_defaults(fn=_tool_runner(name))
    return p


def _int_at_least(text: str, low: int) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if n < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}")
    return n


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def _non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    return int(v) if v and v.isdigit() else None


# -- tool subcommands (entry-point group ``kvgate.commands``) ---------------------------------------------------------
# The tools (simulator, benchmark, real-engine launcher) are separate top-level packages installed through extras.
# They register their commands as entry points; this module never imports them by name.

ENTRY_POINT_GROUP = "kvgate.commands"


@dataclass(frozen=True)
class KnownTool:
    extra: str
    help: str


#: Commands shipped in this distribution: which extra each needs, for a clear message when it is missing.
KNOWN_TOOLS: dict[str, KnownTool] = {
    "sim": KnownTool("sim", "SIMULATOR: start a simulated vLLM + LMCache fleet on loopback (test/bench tool)"),
    "bench": KnownTool("bench", "benchmark routing modes on realistic workloads"),
    "demo": KnownTool("bench", "one-command demo: simulated fleet + gateway, round-robin vs kvcache"),
    "real": KnownTool("real", "start/stop/inspect a real vLLM-CPU + LMCache fleet on loopback (up/down/status)"),
}

ToolMain = Callable[..., int]


def _entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _tool_commands() -> dict[str, str]:
    """Every tool command to offer: the known ones plus any other registered entry point, with a help line."""
    found = {name: f"tool command from {ep.value}" for name, ep in _entry_points().items()}
    return {**found, **{name: tool.help for name, tool in KNOWN_TOOLS.items()}}


def _missing_extra(name: str, why: str) -> int:
    tool = KNOWN_TOOLS.get(name)
    if tool is None:
        print(f"kvgate {name}: not available ({why})", file=sys.stderr)
    else:
        print(f"kvgate {name}: not available ({why}); install the '{tool.extra}' extra: "
              f"pip install 'kvgate[{tool.extra}]'", file=sys.stderr)  # fmt: skip
    return 2


def load_tool(name: str) -> ToolMain | str:
    """The tool's ``main(argv, prog=...)``, or a one-line reason it cannot be loaded."""
    ep = _entry_points().get(name)
    if ep is None:
        return f"no '{name}' entry point in group {ENTRY_POINT_GROUP!r}"
    try:
        fn = ep.load()
    except ImportError as exc:  # the tool package or one of its extra's dependencies is not installed
        return f"{type(exc).__name__}: {exc}"
    if not callable(fn):
        return f"entry point {ep.value} is not callable"
    return cast(ToolMain, fn)


def run_tool(name: str, argv: list[str]) -> int:
    loaded = load_tool(name)
    if isinstance(loaded, str):
        return _missing_extra(name, loaded)
    return int(loaded(argv, prog=f"kvgate {name}"))


def _tool_runner(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        return run_tool(name, list(args.rest))

    return run


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _tool_commands():  # tools own their whole argument list (and --help)
        return run_tool(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
