"""Tooling that makes the shipped editor workflows from their API twins (see make.py); not part of the
pack. It drives ComfyUI's own frontend on the test suite's tiny models (tests/support)."""
