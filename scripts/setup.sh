#!/usr/bin/env bash
# Set up the development environment from this repository's own files:
#   .venv/  torch + torchvision, the runtime stack (requirements.txt), the test tools.
# When a ComfyUI checkout is found (COMFYUI_PATH, else /opt/ComfyUI) whose Python is
# another interpreter, the pack's runtime requirements are installed there too, as for
# any custom node. ComfyUI itself is never fetched or built here.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"

if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
echo "== installing $TORCH_SPEC"
.venv/bin/python -m pip install --quiet --disable-pip-version-check $TORCH_SPEC
echo "== installing requirements.txt and requirements-test.txt"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-test.txt

COMFYUI="$(.venv/bin/python -c 'from omniid.comfy_server import find_comfyui; print(find_comfyui() or "")')"
if [ -n "$COMFYUI" ]; then
    COMFY_PY="$(.venv/bin/python -c "from pathlib import Path; from omniid.comfy_server import comfyui_python; print(comfyui_python(Path('$COMFYUI')))")"
    prefix() { "$1" -c 'import sys; print(sys.prefix)'; }
    if [ "$(prefix "$COMFY_PY")" != "$(prefix .venv/bin/python)" ]; then
        echo "== installing requirements.txt into ComfyUI's Python ($COMFY_PY)"
        "$COMFY_PY" -m pip install --quiet --disable-pip-version-check -r requirements.txt
    fi
else
    echo "== no ComfyUI checkout found (set COMFYUI_PATH): the pack's environment is ready, ComfyUI is not"
fi
echo "== setup done"
