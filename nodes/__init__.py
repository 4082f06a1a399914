"""ComfyUI adapters: the only package of the pack that imports ComfyUI."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import (adapter_nodes, encoder_nodes, flame_nodes, infinite_id_nodes, metrics_nodes, rb_guidance_nodes,
               training_nodes)
from .face_nodes import FaceAnalysisLoader, FaceCrop
from .model_folders import register_model_folders

__all__ = ["NODES", "OmniIdentityExtension", "register_model_folders"]

NODES: list[type[io.ComfyNode]] = [
    FaceAnalysisLoader,
    FaceCrop,
    *encoder_nodes.NODES,
    *adapter_nodes.NODES,
    *infinite_id_nodes.NODES,
    *rb_guidance_nodes.NODES,
    *metrics_nodes.NODES,
    *flame_nodes.NODES,
    *training_nodes.NODES,
]


class OmniIdentityExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)

