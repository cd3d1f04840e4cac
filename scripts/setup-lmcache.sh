#!/usr/bin/env bash
# Install the REAL LMCache 0.5.6 cache controller (controller-only, CPU torch) into a separate venv.
#
# Used by the `lmcache` test tier (tests/lmcache) and kvgate_sim.lmcache_real. Idempotent: when the
# venv already holds everything (marker + package versions), it exits within a few seconds.
#
#   venv:   $KVGATE_LMCACHE_VENV, default <project>/.cache/lmcache-venv
#   python: $KVGATE_LMCACHE_PYTHON, default python3.11
#   force:  KVGATE_LMCACHE_REINSTALL=1 rebuilds the venv from scratch
#
# The install follows shared reference §1.1: `pip install --no-deps lmcache==0.5.6`, then CPU torch
# 2.13.0 and the controller's runtime deps. Torch must be the +cpu build; the script refuses to go on
# if pip would bring any CUDA (nvidia-*) wheel.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${KVGATE_LMCACHE_VENV:-$ROOT/.cache/lmcache-venv}"
PY="${KVGATE_LMCACHE_PYTHON:-python3.11}"
LMCACHE_VERSION="0.5.6"
TORCH_VERSION="2.13.0"
MARKER="$VENV/.kvgate-lmcache-ok"
MARKER_TEXT="lmcache==$LMCACHE_VERSION torch==$TORCH_VERSION+cpu v1"

log() { printf '[setup-lmcache] %s\n' "$*"; }
die() { printf '[setup-lmcache] ERROR: %s\n' "$*" >&2; exit 1; }
# shellcheck source=lib/venv.sh
. "$ROOT/scripts/lib/venv.sh"

export LMCACHE_TRACK_USAGE=false DO_NOT_TRACK=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# Fast path: marker written by a completed install + versions still as expected (no heavy imports).
check_versions() {
    "$VENV/bin/python" - "$LMCACHE_VERSION" "$TORCH_VERSION" <<'EOF'
import importlib.metadata as md
import importlib.util
import sys

want_lmcache, want_torch = sys.argv[1], sys.argv[2]
assert md.version("lmcache") == want_lmcache, md.version("lmcache")
torch_v = md.version("torch")
assert torch_v == f"{want_torch}+cpu", f"torch {torch_v} is not the CPU build {want_torch}+cpu"
cuda = [d.metadata["Name"] for d in md.distributions() if (d.metadata["Name"] or "").lower().startswith("nvidia-")]
assert not cuda, f"CUDA wheels present: {cuda}"
for mod in ("fastapi", "uvicorn", "zmq", "msgspec", "transformers", "cpuinfo", "aiohttp", "prometheus_client"):
    assert importlib.util.find_spec(mod) is not None, f"missing module {mod}"
EOF
}

if [[ "${KVGATE_LMCACHE_REINSTALL:-0}" != "1" && -f "$MARKER" && "$(cat "$MARKER")" == "$MARKER_TEXT" ]]; then
    if check_versions 2>/dev/null; then
        log "already installed: $VENV ($MARKER_TEXT)"
        exit 0
    fi
    log "marker present but the venv is incomplete; reinstalling"
fi

start=$(date +%s)
bootstrap_venv "$VENV" "$PY" "${KVGATE_LMCACHE_REINSTALL:-0}" "$MARKER" KVGATE_LMCACHE_PYTHON
PIP=("$VENV/bin/python" -m pip --no-input)

log "pip install --no-deps lmcache==$LMCACHE_VERSION"
"${PIP[@]}" install --no-deps "lmcache==$LMCACHE_VERSION"

# The CPU wheel (2.13.0+cpu) lives in a local find-links dir on the project machines; PyPI has only
# CUDA builds of torch 2.13.0, so pin the local label and fail rather than pull CUDA.
log "pip install torch==$TORCH_VERSION+cpu + controller deps"
if ! "${PIP[@]}" install "torch==$TORCH_VERSION+cpu" fastapi uvicorn msgspec pyzmq prometheus_client pyyaml \
    psutil "numpy<=2.2.6" requests transformers cachetools py-cpuinfo aiohttp; then
    die "pip install failed (is the CPU wheel torch-$TORCH_VERSION+cpu available to pip via find-links?)"
fi

log "verifying versions (CPU torch, no nvidia-* wheels)"
check_versions || die "version check failed"

log "verifying the controller imports and its chunk hash equals kvgate_sim.protocol.lmcache_chunk_hashes"
KVGATE_ROOT="$ROOT" "$VENV/bin/python" - <<'EOF' || die "controller import / chunk-hash parity check failed"
import importlib.util
import os
import random
import sys

import lmcache.v1.api_server.__main__  # noqa: F401  (the controller entry point must import)
from lmcache.v1.token_database import ChunkedTokenDatabase

spec = importlib.util.spec_from_file_location("kvgate_protocol", os.path.join(os.environ["KVGATE_ROOT"], "kvgate_sim/protocol.py"))
proto = importlib.util.module_from_spec(spec)
sys.modules["kvgate_protocol"] = proto
spec.loader.exec_module(proto)

db = ChunkedTokenDatabase()
rng = random.Random(7)
tokens = [rng.randrange(0, 150_000) for _ in range(256 * 3 + 100)]
real = [h for _s, _e, h in db.process_tokens(tokens, make_key=False)]  # exactly what KVController.lookup hashes
ours = proto.lmcache_chunk_hashes(tokens, save_unfull_chunk=True)
assert real == ours, (real, ours)
print(f"chunk hashes match ({len(ours)} chunks)")
EOF

echo "$MARKER_TEXT" > "$MARKER"
end=$(date +%s)
log "done in $((end - start)) s; venv size $(du -sh "$VENV" | cut -f1) at $VENV"
