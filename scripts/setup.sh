#!/usr/bin/env bash
# Set up everything `serve`, `run`, the tests and the benchmarks need, from this repository's
# own files:
#   .venv/              torch 2.14.1 + torchvision 0.29.1, requirements.txt, the optional insightface
#                       backend (requirements-insightface.txt; the tests use it), the test tools, and this
#                       folder as the importable package `omniid` (pip install -e .)
#   ComfyUI             $COMFYUI_PATH, else /opt/ComfyUI, else the embedded copy .comfyui/ComfyUI
#                       (unpacked from the pinned archive in ../shared/vendor, sha256 checked, or
#                       cloned at the pinned commit); the choice is recorded in .comfyui/selected.json
#   ComfyUI's Python    the checkout's own venv if it has one, else .venv (shared): it gets
#                       ComfyUI's requirements (torchaudio left out) and this pack's requirements.txt
# Re-running it changes nothing when all is in place: each pip step is skipped while the
# files it installed from are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
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

if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
pip_step torch .venv/bin/python $TORCH_SPEC
pip_step pack .venv/bin/python -r requirements.txt -r requirements-insightface.txt -r requirements-test.txt
# this folder as the package `omniid` (python -m omniid, the tests, the benchmarks); an editable link, no copy
pip_step omniid .venv/bin/python --no-deps -e .

REQS=.comfyui/comfyui-requirements.txt
mkdir -p .comfyui
{ read -r COMFYUI; read -r COMFY_PY; read -r SOURCE; } < <(
    .venv/bin/python -m omniid.cli.provision --requirements-out "$REQS")
echo "== ComfyUI: $COMFYUI ($SOURCE), run by $COMFY_PY"
same_env() { [ "$("$1" -c 'import sys; print(sys.prefix)')" = "$("$2" -c 'import sys; print(sys.prefix)')" ]; }
if same_env "$COMFY_PY" .venv/bin/python; then
    pip_step comfyui .venv/bin/python $TORCH_SPEC -r "$REQS" -r requirements.txt
else
    # the checkout's own environment: ComfyUI is the user's; the pack's requirements go in, as for any custom
    # node, and the `omniid` link for the tests that run inside ComfyUI's Python
    pip_step pack "$COMFY_PY" -r requirements.txt
    pip_step omniid "$COMFY_PY" --no-deps -e .
fi
echo "== setup done: '.venv/bin/python -m omniid serve' serves ComfyUI with this pack; ./scripts/test.sh tests it"
