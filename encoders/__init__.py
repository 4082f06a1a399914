"""Identity encoders and face analysis (pure torch / numpy; no ComfyUI imports)."""
