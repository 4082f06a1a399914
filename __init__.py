"""ComfyUI-OmniIdentity: identity-preserving portrait nodes (Omni-ID, Infinite-ID, OmniPortrait).

ComfyUI loads this folder as a custom node package and calls ``comfy_entrypoint``
(the V3 node API). Nothing else happens at import: the nodes, and ComfyUI's own
modules, are imported only when ComfyUI asks, so the pack's core (encoders/,
guidance/, training/) imports cleanly without ComfyUI.
"""
import logging


async def comfy_entrypoint():
    try:
        from .nodes import OmniIdentityExtension, register_model_folders
    except Exception:
        logging.getLogger("OmniIdentity").exception("ComfyUI-OmniIdentity failed to import its nodes")
        raise
    register_model_folders()
    return OmniIdentityExtension()


__all__ = ["comfy_entrypoint"]
