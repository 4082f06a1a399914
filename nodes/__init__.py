"""The pack's node classes (ComfyUI's V3 schema): inputs, checks, and one call into comfy_host or the core."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from ..comfy_host import compat
from ..comfy_host.folders import register_model_folders
from . import (adapter_nodes, dataset_nodes, embeds_nodes, encoder_nodes, face_nodes, flame_nodes, infinite_id_nodes,
               infiniteyou_nodes, ipadapter_plus_nodes, metrics_nodes, pivot_nodes, pulid_flux_nodes, rb_guidance_nodes,
               save_nodes, training_nodes)

__all__ = ["NODES", "OmniIdentityExtension", "register_model_folders"]

NODES: list[type[io.ComfyNode]] = [
    *face_nodes.NODES,
    *encoder_nodes.NODES,
    *embeds_nodes.NODES,
    *adapter_nodes.NODES,
    *ipadapter_plus_nodes.NODES,
    *infinite_id_nodes.NODES,
    *pulid_flux_nodes.NODES,
    *infiniteyou_nodes.NODES,
    *rb_guidance_nodes.NODES,
    *metrics_nodes.NODES,
    *flame_nodes.NODES,
    *dataset_nodes.NODES,
    *training_nodes.NODES,
    *save_nodes.NODES,
    *pivot_nodes.NODES,
]


class OmniIdentityExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        # every supported ComfyUI asks for the node list once at load (0.3.64 never calls on_load)
        compat.LOG.info(compat.describe())
        return list(NODES)
