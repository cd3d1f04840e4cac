"""Fixtures of the real-engine tier (``pytest -m real``): real vLLM-CPU engines + LMCache + ``lmcache_controller``.

- Without the real venv (``scripts/real-engines/setup.sh``) every test here is skipped, unless
  ``KVGATE_REQUIRE_REAL=1``, which turns the skip into a failure.
- The fleet (controller + 2 engines: ~2 minutes to start on 2 cores, ~9 GB RSS) is opt-in: it starts only when the
  ``-m`` expression selects ``real`` (e.g. ``pytest -m real``) or ``KVGATE_REAL=1`` / ``KVGATE_REQUIRE_REAL=1``;
  a plain ``pytest`` run skips the fleet tests instead of starting 9 GB of engines by surprise.
- The fleet is started with vLLM KV-cache events on (``RealFleet(kv_events=True)``: each engine connects its PUB
  to one loopback port, LMCache's CPU stores join the stream), so the events tests share the one fleet; events
  cost the engines nothing while no gateway binds that port. Tests that route by ``/lookup`` strip the events
  keys from the written kvgate config (``test_gateway_real.gateway_config``).
- Each engine's LMCache CPU tier is small (``SESSION_LMCACHE_CPU_GB``, ~100 chunks) so that pinning can be shown
  against churn; vLLM's ``/metrics`` carries the ``lmcache:*`` series (``PROMETHEUS_MULTIPROC_DIR`` per engine) and
  LMCache's internal API server runs too (``EngineInfo.lmcache_api_url``).
- The fleet is session-scoped and always stopped.  Each session gets its own run dir
  ``.cache/real-run-pytest/s<pid>`` (logs, LMCache yaml, private caches); fleets left by sessions that died are
  stopped first.  Only one real fleet runs on the machine at a time (``kvgate_real.fleet`` waits for another).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvgate_real import fleet as real

ENGINES = int(os.environ.get("KVGATE_REAL_ENGINES", "2"))
HERE = Path(__file__).resolve().parent

# Tests that change the session fleet, in the order they must run, after every other test of the session
# (file order alone would put test_gateway_real.py after test_fleet.py's engine kill).
FLEET_MUTATING = (
    "test_gateway_real.py::test_gateway_survives_controller_restart",  # kills the controller, restarts it
    "test_fleet.py::test_controller_restart_reregisters_and_resyncs",
    "test_fleet.py::test_killed_engine_is_dropped",  # kills the last engine
    "test_gateway_real.py::test_gateway_fails_over_dead_engine",  # (kills it itself when run alone)
)
# LMCache CPU tier per engine in GB: ~100 chunks of 256 tokens (512 KiB each with the tiny model), so that
# test_pinning_real.py can churn it with ~20 one-off prompts; every other test stores far less than that.
SESSION_LMCACHE_CPU_GB = float(os.environ.get("KVGATE_REAL_TEST_LMCACHE_CPU_GB", "0.05"))
RUNS_DIR = Path(os.environ.get("KVGATE_REAL_TEST_RUNS_DIR") or real.ROOT / ".cache" / "real-run-pytest")


def _require_real_env() -> None:
    problem = real.real_env_problem()
    if problem is None:
        return
    if os.environ.get("KVGATE_REQUIRE_REAL") == "1":
        pytest.fail(f"KVGATE_REQUIRE_REAL=1 but {problem}", pytrace=False)
    pytest.skip(problem)


def _fleet_opted_in(config: pytest.Config) -> bool:
    if os.environ.get("KVGATE_REAL") == "1" or os.environ.get("KVGATE_REQUIRE_REAL") == "1":
        return True
    expr = str(config.getoption("markexpr", "") or "")
    return re.search(r"(?<!not )\breal\b", expr) is not None


def _reap_dead_sessions() -> None:
    """Stop fleets of earlier sessions whose pytest process is gone; delete their run dirs."""
    if not RUNS_DIR.is_dir():
        return
    for run_dir in RUNS_DIR.iterdir():
        if not run_dir.is_dir() or run_dir.name == f"s{os.getpid()}":
            continue
        state_path = run_dir / real.STATE_FILE
        if state_path.exists():
            try:
                owner = int(json.loads(state_path.read_text()).get("owner_pid", 0))
            except (OSError, ValueError):
                owner = 0
            if owner and real.pid_alive(owner):
                continue  # a live session
            with contextlib.suppress(real.FleetError):
                real.RealFleet.from_state(run_dir).stop()
        if not (run_dir / real.STATE_FILE).exists():
            shutil.rmtree(run_dir, ignore_errors=True)


def _mutating_rank(item: pytest.Item) -> int | None:
    path = Path(str(item.fspath)).resolve()
    if path.parent != HERE:
        return None
    name = f"{path.name}::{item.name}"
    return FLEET_MUTATING.index(name) if name in FLEET_MUTATING else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Move the fleet-mutating tests to the end, in ``FLEET_MUTATING`` order; everything else keeps its order."""
    ranks = [_mutating_rank(it) for it in items]
    if all(r is None for r in ranks):
        return
    keep = [it for it, r in zip(items, ranks, strict=True) if r is None]
    last = sorted(((r, it) for it, r in zip(items, ranks, strict=True) if r is not None), key=lambda p: p[0])
    items[:] = keep + [it for _, it in last]


@pytest.fixture(scope="session")
def real_python() -> Path:
    _require_real_env()
    return real.real_python()


@pytest.fixture(scope="session")
def fleet(request: pytest.FixtureRequest) -> Iterator[real.RealFleet]:
    """Controller + ``KVGATE_REAL_ENGINES`` (default 2) engines, ready to store; stopped at session end."""
    _require_real_env()
    if not _fleet_opted_in(request.config):
        pytest.skip("real fleet tests are opt-in (~2 min, ~9 GB): run `pytest -m real` or set KVGATE_REAL=1")
    _reap_dead_sessions()
    run_dir = RUNS_DIR / f"s{os.getpid()}"
    with real.RealFleet(
        run_dir, kv_events=True, lmcache_cpu_gb=SESSION_LMCACHE_CPU_GB, lmcache_api=True, prometheus_multiproc=True
    ) as f:
        f.start(ENGINES)
        yield f
