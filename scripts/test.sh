#!/usr/bin/env bash
# Run the whole test suite: unit tests, and the real-ComfyUI tests when a checkout is
# found (COMFYUI_PATH, else /opt/ComfyUI). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

[ -x .venv/bin/python ] || ./scripts/setup.sh

COMFYUI="$(.venv/bin/python -c 'from omniid.comfy_server import find_comfyui; print(find_comfyui() or "")')"
if [ -z "$COMFYUI" ]; then
    echo "######################################################################"
    echo "#  NO ComfyUI CHECKOUT FOUND (COMFYUI_PATH unset, no /opt/ComfyUI):   #"
    echo "#  the real-ComfyUI integration tests in tests/comfy will be SKIPPED. #"
    echo "######################################################################"
else
    export COMFYUI_PATH="$COMFYUI"
    echo "== real-ComfyUI tests run against $COMFYUI_PATH"
fi
exec .venv/bin/python -m pytest "$@"
