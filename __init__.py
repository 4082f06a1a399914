"""ComfyUI-OmniIdentity: identity-preserving portrait nodes (Omni-ID, Infinite-ID, OmniPortrait).

ComfyUI loads this folder as a custom node package; this file only hands ComfyUI the
V3 entry point. The core (encoders/, guidance/, training/) never imports ComfyUI.
"""
from .nodes import comfy_entrypoint

__all__ = ["comfy_entrypoint"]
