"""The product around the pack: the ``python -m omniid`` command line, its HTTP client for a
ComfyUI server, the server launcher, ComfyUI provisioning, and a builder for API prompts.
Never loaded by ComfyUI itself."""
