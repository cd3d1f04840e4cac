"""Tool subcommands of ``kvgate`` come from the ``kvgate.commands`` entry points; a missing extra is named."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvgate import cli


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_tool_commands_are_registered_entry_points() -> None:
    eps = cli._entry_points()
    assert {"sim", "bench", "demo", "real"} <= set(eps)
    assert eps["sim"].value == "kvgate_sim.cli:main" and eps["real"].value == "kvgate_real.cli:main"
    loaded = cli.load_tool("real")
    assert callable(loaded)


@pytest.mark.parametrize(
    ("command", "blocked", "extra"),
    [("sim", "zmq", "sim"), ("bench", "matplotlib", "bench"), ("demo", "rich", "bench")],
)
def test_missing_extra_is_named_and_exits_2(command: str, blocked: str, extra: str) -> None:
    # a module set to None in sys.modules raises ImportError on import, as if the extra were not installed
    r = _run(f"import sys; sys.modules[{blocked!r}] = None\n"
             f"from kvgate.cli import main; sys.exit(main([{command!r}, '--help']))")  # fmt: skip
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert f"pip install 'kvgate[{extra}]'" in r.stderr
    assert blocked in r.stderr  # says what is missing
    assert "Traceback" not in r.stderr


def test_tool_help_runs_through_the_entry_point() -> None:
    r = _run("import sys; from kvgate.cli import main; sys.exit(main(['real', '--help']))")
    assert r.returncode == 0, r.stderr
    assert "usage: kvgate real" in r.stdout and "up" in r.stdout and "status" in r.stdout


def test_unknown_command_is_an_argparse_error() -> None:
    r = _run("import sys; from kvgate.cli import main; sys.exit(main(['nope']))")
    assert r.returncode == 2 and "invalid choice: 'nope'" in r.stderr
