"""Datasets, decoders, the training loop and metrics (pure torch; no ComfyUI imports)."""
