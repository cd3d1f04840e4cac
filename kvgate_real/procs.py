"""Processes of a run: spawning, /proc scanning, process groups, killing, RSS, free ports, loopback listeners,
log watching."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from kvgate_real.locations import DEGRADED, ENTER_FREEZE, EXIT_FREEZE, LOOPBACK, RUN_TAG, FleetError


# -- processes -----------------------------------------------------------------------------------------------------
def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, pgid) of a live process, None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[2])


def pid_alive(pid: int) -> bool:
    st = _proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def _all_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def pids_in_group(pgid: int) -> list[int]:
    out = []
    for pid in _all_pids():
        st = _proc_stat(pid)
        if st is not None and st[1] == pgid and st[0] not in ("Z", "X"):
            out.append(pid)
    return out


def spawn_logged(
    name: str, cmd: list[str], env: dict[str, str], log_path: Path, cwd: Path, fresh_log: bool
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in a new session (its own process group), stdout+stderr appended to ``log_path`` after a
    ``### <time> start <name>: <cmd>`` line (``fresh_log``: truncate first)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb" if fresh_log else "ab") as log:
        log.write(f"### {time.strftime('%Y-%m-%d %H:%M:%S')} start {name}: {' '.join(cmd)}\n".encode())
        log.flush()
        return subprocess.Popen(
            cmd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=str(cwd),
            start_new_session=True,
        )


def kill_group(
    pgid: int,
    name: str,
    reap: Callable[[int], None],
    log: Callable[[str], None],
    first_signal: int = signal.SIGTERM,
    grace: float = 20.0,
) -> None:
    """Signal the process group; escalate to SIGKILL after ``grace`` seconds; wait until it is empty.

    ``reap(pgid)`` lets the caller poll the leader when it is its child (collects its exit status)."""
    sigs = [first_signal] if first_signal == signal.SIGKILL else [first_signal, signal.SIGKILL]
    for sig in sigs:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + (grace if sig != signal.SIGKILL else 10.0)
        while time.monotonic() < deadline:
            reap(pgid)
            if not pids_in_group(pgid):
                log(f"stopped {name} (group {pgid}, {signal.Signals(sig).name})")
                return
            time.sleep(0.2)
    left = pids_in_group(pgid)
    if left:
        raise FleetError(f"{name}: processes {left} of group {pgid} survived SIGKILL")


def sigkill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def pids_with_tag(run_id: str) -> list[int]:
    """Live processes whose environment carries ``KVGATE_REAL_RUN_ID=<run_id>`` (children inherit it)."""
    needle = f"{RUN_TAG}={run_id}".encode()
    out = []
    for pid in _all_pids():
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0") and pid_alive(pid):
            out.append(pid)
    return out


def rss_mb(pids: Iterable[int]) -> float:
    total_kb = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
        except OSError:
            continue
    return round(total_kb / 1024, 1)


def free_ports(n: int, taken: set[int]) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (sockets held open together so they differ)."""
    socks: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((LOOPBACK, 0))
            socks.append(s)
            port = s.getsockname()[1]
            if port not in taken:
                ports.append(port)
    finally:
        for s in socks:
            s.close()
    taken.update(ports)
    return ports


def listeners(pids: set[int]) -> list[tuple[str, str, int]] | None:
    """``ss -ltunp`` rows of the given pids as (netid, local address, pid); None when ``ss`` is unavailable."""
    if shutil.which("ss") is None:
        return None
    proc = subprocess.run(["ss", "-H", "-ltunp"], capture_output=True, text=True, check=False)
    rows = []
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) < 5:
            continue
        for pid in {int(x) for x in re.findall(r"pid=(\d+)", line)} & pids:
            rows.append((parts[0], parts[4], pid))
    return rows


def is_loopback_address(local: str) -> bool:
    host = local.rsplit(":", 1)[0].strip("[]").split("%", 1)[0]
    return host.startswith("127.") or host == "::1"


class _LogWatch:
    """Incrementally scans a log file for the lines readiness depends on."""

    def __init__(self, path: Path, from_start: bool = True) -> None:
        self.path = path
        self.offset = 0 if from_start or not path.exists() else path.stat().st_size
        self.counts = {DEGRADED: 0, ENTER_FREEZE: 0, EXIT_FREEZE: 0}
        self._carry = ""

    def poll(self) -> dict[str, int]:
        try:
            with self.path.open("rb") as fh:
                if os.fstat(fh.fileno()).st_size < self.offset:  # truncated: start over
                    self.offset, self._carry = 0, ""
                fh.seek(self.offset)
                chunk = fh.read()
        except OSError:
            return self.counts
        self.offset += len(chunk)
        text = self._carry + chunk.decode(errors="replace")
        lines = text.split("\n")
        self._carry = lines.pop()
        for line in lines:
            for key in self.counts:
                if key in line:
                    self.counts[key] += 1
        return self.counts

    def frozen(self) -> bool:
        self.poll()
        return self.counts[ENTER_FREEZE] > self.counts[EXIT_FREEZE]

    def tail(self, n_chars: int = 3000) -> str:
        try:
            data = self.path.read_bytes()[-n_chars:]
        except OSError:
            return ""
        return data.decode(errors="replace")
