"""Test support: assets from PyPI packages, fixtures, the headless browser driver, helpers for
tests and benchmarks that drive a real ComfyUI. Importable as ``support`` (pytest puts tests/
on the path; benchmarks/common.py does the same)."""
