#!/usr/bin/env bash
# Set up everything `serve`, `run`, the tests and the benchmarks need, from this repository's
# own files, for one pinned ComfyUI host (cli/provision.py HOSTS):
#   ./scripts/setup.sh                   ComfyUI 0.33.0 (the default, what users run) in .venv
#   ./scripts/setup.sh --host 0.3.64     ComfyUI 0.3.64 (the oldest supported) in .venv-0.3.64
#   (or OMNIID_COMFYUI_HOST=0.3.64)
# Each host's environment gets its torch pins, requirements.txt, the optional insightface backend
# (requirements-insightface.txt; the tests use it), the test tools, and this folder as the
# importable package `omniid` (pip install -e .).
#   ComfyUI             $COMFYUI_PATH, else /opt/ComfyUI (default host), else the embedded copy
#                       .comfyui/ComfyUI-<version> (unpacked from the pinned archive in
#                       ../shared/vendor, sha256 checked, or cloned at the pinned commit); the choice is
#                       recorded in .comfyui/selected-<version>.json
#   ComfyUI's Python    the checkout's own venv if it has one, else the host's environment: it gets
#                       ComfyUI's requirements and this pack's requirements (insightface included, so
#                       the tests that drive that ComfyUI find the backend)
# Re-running it changes nothing when all is in place: each pip step is skipped while the
# files it installed from are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [ "${1:-}" = "--host" ]; then
    export OMNIID_COMFYUI_HOST="$2"
    shift 2
fi
{ read -r HOST; read -r VENV; read -r HOST_TORCH; } < <("$PYTHON" cli/provision.py --describe)
TORCH_SPEC="${TORCH_SPEC:-$HOST_TORCH}"
export OMNIID_COMFYUI_HOST="$HOST"
echo "== host: ComfyUI $HOST in $VENV ($TORCH_SPEC)"
PIP=(-m pip install --quiet --disable-pip-version-check)

# pip_step NAME PYTHON ARGS...: run `PYTHON -m pip install ARGS` unless the same NAME ran with the
# same arguments and requirement files before (a stamp in that interpreter's prefix).
pip_step() {
    local name="$1" python="$2"; shift 2
    local prefix stamp digest
    prefix="$("$python" -c 'import sys; print(sys.prefix)')"
    stamp="$prefix/.omniid-setup-$name"
    digest="$( { echo "$*"; for arg in "$@"; do [ -f "$arg" ] && cat "$arg"; done; true; } | sha256sum | cut -d' ' -f1)"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$digest" ]; then
        echo "== $name: up to date"
        return
    fi
    echo "== $name: pip install $*"
    "$python" "${PIP[@]}" "$@"
    echo "$digest" > "$stamp"
}

PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
    echo "== creating $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
fi
pip_step torch "$PY" $TORCH_SPEC
pip_step pack "$PY" $TORCH_SPEC -r requirements.txt -r requirements-insightface.txt -r requirements-train.txt \
    -r requirements-test.txt
# this folder as the package `omniid` (python -m omniid, the tests, the benchmarks); an editable link, no copy
pip_step omniid "$PY" --no-deps -e .

REQS=".comfyui/comfyui-requirements-$HOST.txt"
mkdir -p .comfyui
{ read -r COMFYUI; read -r COMFY_PY; read -r SOURCE; } < <(
    "$PY" -m omniid.cli.provision --host "$HOST" --requirements-out "$REQS")
echo "== ComfyUI: $COMFYUI ($SOURCE), run by $COMFY_PY"
same_env() { [ "$("$1" -c 'import sys; print(sys.prefix)')" = "$("$2" -c 'import sys; print(sys.prefix)')" ]; }
if same_env "$COMFY_PY" "$PY"; then
    pip_step comfyui "$PY" $TORCH_SPEC -r "$REQS" -r requirements.txt
else
    # the checkout's own environment: ComfyUI is the user's; the pack's requirements go in, as for any custom
    # node (with the insightface backend the tests use), and the `omniid` link for the tests that run inside
    # ComfyUI's Python
    pip_step pack "$COMFY_PY" -r requirements.txt -r requirements-insightface.txt
    pip_step omniid "$COMFY_PY" --no-deps -e .
fi
echo "== setup done: '$PY -m omniid serve' serves ComfyUI $HOST with this pack; OMNIID_COMFYUI_HOST=$HOST ./scripts/test.sh tests it"
