#!/usr/bin/env bash
# Run the test suite against one pinned ComfyUI host: the unit tests, and the tests that drive the
# real ComfyUI that setup recorded for that host (tests/comfy) and its frontend in headless Chromium.
#   ./scripts/test.sh [PYTEST ARGS]                         ComfyUI 0.33.0 (the default), in .venv
#   OMNIID_COMFYUI_HOST=0.3.64 ./scripts/test.sh [ARGS]     ComfyUI 0.3.64, in .venv-0.3.64
# With CI set, a test that would skip (no ComfyUI, no browser) fails instead.
set -euo pipefail
cd "$(dirname "$0")/.."

{ read -r HOST; read -r VENV; read -r _; } < <(python3 cli/provision.py --describe)
export OMNIID_COMFYUI_HOST="$HOST"
[ -x "$VENV/bin/python" ] && [ -f ".comfyui/selected-$HOST.json" ] || ./scripts/setup.sh

COMFYUI="$("$VENV/bin/python" -c 'from omniid.cli.provision import find_comfyui; print(find_comfyui() or "")')"
if [ -n "$COMFYUI" ]; then
    export COMFYUI_PATH="$COMFYUI"
    echo "== real-ComfyUI tests run against ComfyUI $HOST at $COMFYUI_PATH"
fi
exec "$VENV/bin/python" -m pytest "$@"
