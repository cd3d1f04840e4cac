"""Where the real tier lives: constants, the real venv, the tiny model, the run directory."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _project_root() -> Path:
    """The checkout this package runs from (its ``.cache`` holds the real venv); the working directory when the
    package is installed from a wheel.  Override every location with the ``KVGATE_REAL_*`` variables."""
    here = Path(__file__).resolve().parents[1]
    return here if (here / "pyproject.toml").is_file() else Path.cwd()


ROOT = _project_root()
SHIMS_DIR = Path(__file__).resolve().parent / "shims"
SETUP_SCRIPT = "scripts/real-engines/setup.sh"
VENV_MARKER = ".kvgate-real-ok"
MODEL_NAME = "tiny"
CHUNK_SIZE = 256
LOCATION = "LocalCPUBackend"
RUN_TAG = "KVGATE_REAL_RUN_ID"
STATE_FILE = "state.json"
KVGATE_CONFIG_FILE = "kvgate.yaml"
LOOPBACK = "127.0.0.1"
DEGRADED = "degraded mode"
ENTER_FREEZE = "Entering freeze mode"
EXIT_FREEZE = "Exiting freeze mode"

REGISTRY_DIR = Path(os.environ.get("KVGATE_REAL_REGISTRY") or Path(tempfile.gettempdir()) / "kvgate-real-fleets")


# -- locations -----------------------------------------------------------------------------------------------------
def venv_dir() -> Path:
    return Path(os.environ.get("KVGATE_REAL_VENV") or ROOT / ".cache" / "real-venv")


def real_python() -> Path:
    return venv_dir() / "bin" / "python"


def model_dir() -> Path:
    return Path(os.environ.get("KVGATE_REAL_MODEL") or ROOT / ".cache" / "real-model" / "tiny")


def default_run_dir() -> Path:
    return Path(os.environ.get("KVGATE_REAL_RUN_DIR") or ROOT / ".cache" / "real-run")


def real_env_problem() -> str | None:
    """``None`` when the real venv and the model are installed, else why not (naming the setup script)."""
    py, venv, model = real_python(), venv_dir(), model_dir()
    if not py.exists():
        return f"real venv missing ({venv}); run {SETUP_SCRIPT}"
    if not (venv / VENV_MARKER).is_file():
        return f"real venv incomplete (no {VENV_MARKER} in {venv}); run {SETUP_SCRIPT}"
    if not (model / "config.json").is_file() or not (model / "tokenizer.json").is_file():
        return f"tiny model missing ({model}); run {SETUP_SCRIPT}"
    return None


class FleetError(RuntimeError):
    pass
