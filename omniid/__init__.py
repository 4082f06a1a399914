"""Command-line and test tooling around a real ComfyUI (not loaded by ComfyUI itself)."""
