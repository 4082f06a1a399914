#!/usr/bin/env bash
# Run the whole test suite: the unit tests, and the tests that drive the real ComfyUI that setup
# recorded (tests/comfy) and its frontend in headless Chromium. Extra arguments go to pytest.
# With CI set, a test that would skip (no ComfyUI, no browser) fails instead.
set -euo pipefail
cd "$(dirname "$0")/.."

[ -x .venv/bin/python ] && [ -f .comfyui/selected.json ] || ./scripts/setup.sh

COMFYUI="$(.venv/bin/python -c 'from omniid.cli.provision import find_comfyui; print(find_comfyui() or "")')"
if [ -n "$COMFYUI" ]; then
    export COMFYUI_PATH="$COMFYUI"
    echo "== real-ComfyUI tests run against $COMFYUI_PATH"
fi
exec .venv/bin/python -m pytest "$@"
