"""Attention math and sampling guidance (pure torch; no ComfyUI imports)."""
