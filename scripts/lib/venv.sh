# Shared by the set-up scripts (source it after defining log and die).
#
# bootstrap_venv VENV PYTHON REINSTALL MARKER PY_HINT
#   Checks PYTHON exists (PY_HINT names the env var that overrides it), removes VENV when REINSTALL
#   is 1, drops the completion MARKER, and creates VENV with PYTHON unless it already has a python.
bootstrap_venv() {
    local venv="$1" py="$2" reinstall="$3" marker="$4" hint="$5"
    command -v "$py" >/dev/null 2>&1 || die "$py not found (set $hint)"
    if [[ "$reinstall" == "1" && -d "$venv" ]]; then
        log "removing $venv (reinstall requested)"
        rm -rf "$venv"
    fi
    rm -f "$marker"
    if [[ ! -x "$venv/bin/python" ]]; then
        log "creating venv $venv with $py"
        mkdir -p "$(dirname "$venv")"
        "$py" -m venv "$venv"
    fi
}
