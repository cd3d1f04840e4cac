"""``kvgate sim``: SIMULATOR — start a simulated vLLM + LMCache fleet on loopback (a test/benchmark tool)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any

# The 'sim' extra, imported up front so that ``kvgate sim`` without it names the extra instead of failing mid-run.
import msgspec  # noqa: F401
import yaml
import zmq  # noqa: F401

from kvgate_sim.engine_model import PROFILES, EngineConfig
from kvgate_sim.fleet import KVCACHE_RECOMMENDED_LOOKUP, default_kv_events, start_fleet
from kvgate_sim.kv_publisher import KVEventsConfig, engine_binds


def build_parser(prog: str = "kvgate sim") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="SIMULATOR (test and benchmark tool, not a real engine): start N simulated vLLM-shaped engines "
        "with real prefix-cache semantics plus an LMCache-compatible controller on 127.0.0.1, print their URLs and "
        "write a ready-to-use kvgate config whose endpoint ids equal the engines' LMCache instance ids.",
    )
    p.add_argument("--engines", type=int, default=4, help="number of engines (default 4)")
    p.add_argument("--profile", choices=sorted(PROFILES), default="h100", help="timing profile (default h100)")
    p.add_argument("--time-scale", type=float, default=1.0, help="multiply every modelled duration (default 1.0)")
    p.add_argument("--gpu-blocks", type=int, default=None, help="GPU KV blocks per engine (default: from profile)")
    p.add_argument("--lmcache-chunks", type=int, default=2048, help="LMCache CPU-tier capacity in 256-token chunks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--controller",
        dest="no_controller",
        action="store_false",
        default=False,
        help="start the simulated LMCache controller (the default)",
    )
    p.add_argument(
        "--no-controller", dest="no_controller", action="store_true", help="do not start the simulated controller"
    )
    p.add_argument(
        "--lmcache-controller",
        metavar="URL",
        default=None,
        help="HTTP URL of a REAL LMCache controller the engines register with (needs --lmcache-pull and "
        "--lmcache-reply); the generated config then points the kvcache filter at it",
    )
    p.add_argument("--lmcache-pull", metavar="HOST:PORT", default=None, help="real controller's ZMQ pull address")
    p.add_argument("--lmcache-reply", metavar="HOST:PORT", default=None, help="real controller's ZMQ reply address")
    p.add_argument(
        "--kv-events-config",
        metavar="JSON",
        default=None,
        help="vLLM's --kv-events-config for every engine (keys enable_kv_cache_events, publisher, endpoint, topic, "
        "replay_endpoint, buffer_steps, hwm). '{instance}' in topic becomes the engine id; an endpoint with a "
        "wildcard (tcp://*:N, tcp://127.0.0.1:*) is bound by each engine (numeric ports offset by the engine "
        "index, '*' = ephemeral), any other tcp://host:port is connected to (the gateway binds it). Default: "
        "events on, a free loopback port the gateway binds, topic kv.{instance}, replay on ephemeral ports",
    )
    p.add_argument(
        "--no-kv-events", action="store_true", help="engines publish no KV events (config: the /lookup index)"
    )
    p.add_argument(
        "--lmcache-removal-events",
        action="store_true",
        help="also publish BlockRemoved (medium cpu) when the LMCache tier evicts a chunk (real LMCache 0.5.6 "
        "in-process mode emits none; off by default to match it)",
    )
    p.add_argument("--config-out", default="kvgate-sim.yaml", help="where to write the kvgate config")
    p.add_argument("--gateway-port", type=int, default=8888, help="listener port written into the config")
    return p


async def run(args: argparse.Namespace) -> int:
    if args.engines < 1:
        print("kvgate sim: --engines must be >= 1")
        return 2
    real = None
    if args.lmcache_controller:
        if not (args.lmcache_pull and args.lmcache_reply):
            print("kvgate sim: --lmcache-controller needs --lmcache-pull and --lmcache-reply")
            return 2
        real = (args.lmcache_pull, args.lmcache_reply)
    try:
        kv_events = _kv_events(args)
    except ValueError as exc:
        print(f"kvgate sim: {exc}")
        return 2
    cfg = replace(
        EngineConfig(profile=args.profile, time_scale=args.time_scale),
        num_gpu_blocks=args.gpu_blocks,
        lmcache_capacity_chunks=args.lmcache_chunks,
        lmcache_removal_events=args.lmcache_removal_events,
    )
    fleet = await start_fleet(
        args.engines,
        engine_config=cfg,
        controller=not args.no_controller and real is None,
        lmcache_controller=real,
        seed=args.seed,
        kv_events=kv_events,
    )
    try:
        if real is not None:
            fleet.controller_url = args.lmcache_controller.rstrip("/")
        print(f"SIMULATED fleet ({args.profile}, time scale {args.time_scale:g}) — a test/benchmark tool:")
        for e in fleet.engines:
            print(f"  engine {e.instance_id:<8} {e.url}")
        if fleet.controller_url:
            kind = "real LMCache controller" if real else "simulated LMCache controller"
            print(f"  {kind}: {fleet.controller_url}")
        ev = fleet.kv_events_config()
        if ev is not None:
            where = f"gateway binds {ev['bind']}" if "bind" in ev else "engines bind, gateway connects"
            print(f"  KV events: {len(ev['sources'])} sources ({where})")
        gw_cfg = fleet.gateway_config(kvcache=recommended_kvcache(fleet), listener_port=args.gateway_port)
        await asyncio.to_thread(Path(args.config_out).write_text, yaml.safe_dump(gw_cfg, sort_keys=False))
        print(f"kvgate config written to {args.config_out}  (run: kvgate serve -c {args.config_out})")
        print("Ctrl-C to stop.", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await fleet.stop()
        print("fleet stopped.")
    return 0


def _kv_events(args: argparse.Namespace) -> KVEventsConfig | None:
    if args.no_kv_events:
        return None
    if args.kv_events_config is None:
        return default_kv_events()
    try:
        data = json.loads(args.kv_events_config)
    except json.JSONDecodeError as e:
        raise ValueError(f"--kv-events-config is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError("--kv-events-config must be a JSON object")
    data.setdefault("topic", "kv.{instance}")
    cfg = KVEventsConfig.from_dict(data)
    if not cfg.active:
        return None
    if args.engines > 1 and not engine_binds(cfg.endpoint) and "{instance}" not in cfg.topic:
        raise ValueError(
            "--kv-events-config: engines that connect to one gateway address need distinct topics: put {instance} "
            "in topic"
        )
    return cfg


def recommended_kvcache(fleet: Any) -> dict[str, Any] | bool:
    """The kvcache filter settings ``kvgate sim`` writes (issue 9 item 5): the recommended routing keys, the
    engines' tokenizer directory as ``local_tokenizer`` and, when the engines publish KV events, the event index.
    False (no kvcache filter) when the fleet offers neither a controller nor events."""
    local = fleet.local_routing_config()
    if not fleet.controller_url and "kv_events" not in local:
        return False
    return {**KVCACHE_RECOMMENDED_LOOKUP, **local}


def main(argv: list[str] | None = None, prog: str = "kvgate sim") -> int:
    args = build_parser(prog).parse_args(argv)
    return asyncio.run(run(args))
