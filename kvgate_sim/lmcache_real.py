"""Start / stop the REAL LMCache 0.5.6 controller from its own venv (SIMULATOR tooling, tests only).

The venv is made by ``scripts/setup-lmcache.sh``: ``$KVGATE_LMCACHE_VENV``, default
``<project>/.cache/lmcache-venv``. The controller binds HTTP and all three ZMQ sockets on 127.0.0.1
with free ports, telemetry off, ``PYTHONHASHSEED=0``. It runs in its own process group, which
:meth:`RealController.stop` always kills (also when startup fails).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any


def _project_root() -> Path:
    """The checkout this package runs from (its ``.cache`` holds the controller venv); the working directory when
    the package is installed from a wheel. ``$KVGATE_LMCACHE_VENV`` overrides the venv location."""
    here = Path(__file__).resolve().parents[1]
    return here if (here / "pyproject.toml").is_file() else Path.cwd()


PROJECT_ROOT = _project_root()
VENV_ENV = "KVGATE_LMCACHE_VENV"
MARKER_NAME = ".kvgate-lmcache-ok"
SETUP_SCRIPT = "scripts/setup-lmcache.sh"
HOST = "127.0.0.1"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only: never via a proxy


def lmcache_venv() -> Path:
    """The real controller's venv (same rule as ``scripts/setup-lmcache.sh``)."""
    env = os.environ.get(VENV_ENV)
    return Path(env) if env else PROJECT_ROOT / ".cache" / "lmcache-venv"


def lmcache_python(venv: Path | None = None) -> Path:
    return (venv or lmcache_venv()) / "bin" / "python"


def lmcache_available(venv: Path | None = None) -> bool:
    """True when the setup script completed for this venv (marker present, python present)."""
    v = venv or lmcache_venv()
    return (v / MARKER_NAME).is_file() and lmcache_python(v).is_file()


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (racy by nature; callers retry on bind failure)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class RealController:
    """A running real controller process and its loopback endpoints."""

    proc: subprocess.Popen[bytes]
    http_port: int
    pull_port: int
    reply_port: int
    heartbeat_port: int
    log_path: Path
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    @property
    def pull_url(self) -> str:
        """``controller_pull_url`` for workers (``host:port``, no scheme, like LMCache configs)."""
        return f"{HOST}:{self.pull_port}"

    @property
    def reply_url(self) -> str:
        return f"{HOST}:{self.reply_port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n_bytes: int = 4000) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return ""
        return data[-n_bytes:].decode("utf-8", "replace")

    def stop(self, timeout: float = 5.0) -> None:
        """Kill the whole process group (SIGTERM, then SIGKILL); idempotent."""
        _kill_group(self.proc, timeout)
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.close()
            self._log = None

    def __enter__(self) -> RealController:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _kill_group(proc: subprocess.Popen[bytes], timeout: float) -> None:
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        pgid = None
    if pgid is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    if pgid is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)


def http_json(url: str, body: Any = None, method: str | None = None, timeout: float = 10.0) -> tuple[int, Any]:
    """Tiny stdlib JSON HTTP call (status, parsed body); used for readiness and by sync tests."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method or ("GET" if body is None else "POST"))
    if data is not None:
        req.add_header("content-type", "application/json")
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as err:
        raw = err.read()
        status = err.code
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode("utf-8", "replace")


def _spawn(venv: Path, ports: list[int], log_path: Path) -> RealController:
    http_port, pull, reply, hb = ports
    env = dict(os.environ)
    env.update({"LMCACHE_TRACK_USAGE": "false", "DO_NOT_TRACK": "1", "PYTHONHASHSEED": "0", "PYTHONUNBUFFERED": "1"})
    monitor = json.dumps({"pull": pull, "reply": reply, "heartbeat": hb})
    cmd = [
        str(lmcache_python(venv)),
        "-m",
        "lmcache.v1.api_server",
        "--host",
        HOST,
        "--port",
        str(http_port),
        "--monitor-ports",
        monitor,
    ]
    log = open(log_path, "wb")  # closed by RealController.stop
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            cwd=str(venv),
        )
    except BaseException:
        log.close()
        raise
    return RealController(proc, http_port, pull, reply, hb, log_path, log)


def start_real_controller(
    venv: Path | None = None, startup_timeout: float = 90.0, log_path: Path | None = None, attempts: int = 3
) -> RealController:
    """Start the real controller and wait until ``GET /controller/key-stats`` answers 200.

    Raises ``FileNotFoundError`` if the venv is missing (run ``scripts/setup-lmcache.sh``) and
    ``RuntimeError`` / ``TimeoutError`` if it does not come up; the process group is killed then.
    """
    v = venv or lmcache_venv()
    if not lmcache_available(v):
        raise FileNotFoundError(f"real LMCache controller venv not found at {v}: run {SETUP_SCRIPT}")
    last_error = "no attempt"
    for _ in range(max(1, attempts)):
        path = log_path or Path(tempfile.mkstemp(prefix="lmcache-controller-", suffix=".log")[1])
        ctl = _spawn(v, free_ports(4), path)
        try:
            deadline = time.monotonic() + startup_timeout
            while time.monotonic() < deadline:
                if not ctl.alive():
                    last_error = f"controller exited with {ctl.proc.returncode}:\n{ctl.log_tail()}"
                    break
                with contextlib.suppress(OSError):
                    status, _ = http_json(ctl.url + "/controller/key-stats", timeout=2.0)
                    if status == 200:
                        return ctl
                time.sleep(0.2)
            else:
                raise TimeoutError(f"controller not ready after {startup_timeout}s:\n{ctl.log_tail()}")
        except BaseException:
            ctl.stop()
            raise
        ctl.stop()
        if "Address already in use" not in last_error:
            break
    raise RuntimeError(last_error)


@contextlib.contextmanager
def real_controller(venv: Path | None = None, startup_timeout: float = 90.0) -> Iterator[RealController]:
    """``with real_controller() as ctl:`` — always stopped on exit."""
    ctl = start_real_controller(venv, startup_timeout)
    try:
        yield ctl
    finally:
        ctl.stop()
