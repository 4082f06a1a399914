"""The pack's IPAdapter_plus nodes as ComfyUI sees them, in a process with ComfyUI importable: the editor layout
the converter writes against the nodes' schemas, and the nodes' execute / validate_inputs (small random models
from ipadapter_plus_ref)."""
from __future__ import annotations


import torch

from . import ip_layouts as L
from .assets import scratch_dir
from .ipadapter_plus_ref import clip_vision, cross_attention_widths, h94_file, relative, sample, unet


def converter_layout_problems() -> list:
    """Where cli/convert.py's editor layout of a node (widget order, sockets, outputs) differs from the node's
    schema in this ComfyUI: [] when none."""
    from omniid.cli import convert_tables as C
    from omniid.comfy_host.folders import register_model_folders
    register_model_folders()
    from omniid.nodes.adapter_nodes import AdapterLoader
    from omniid.nodes.face_nodes import FaceAnalysisLoader
    from omniid.nodes.ipadapter_plus_nodes import ApplyIPAdapterCompat, IPAdapterNoise, PrepImageForClipVision
    sockets_types = {"MODEL", "IDENTITY_ADAPTER", "CLIP_VISION", "IMAGE", "MASK", "FACE_ANALYSIS"}
    problems = []
    for cls, kind in ((ApplyIPAdapterCompat, C.COMPAT), (AdapterLoader, C.ADAPTER_LOADER),
                      (FaceAnalysisLoader, C.FACE_LOADER), (PrepImageForClipVision, C.PREP),
                      (IPAdapterNoise, C.NOISE)):
        schema = cls.define_schema()
        widgets = tuple(i.id for i in schema.inputs
                        if i.get_io_type() not in sockets_types and not getattr(i, "force_input", False))
        sockets = tuple((i.id, i.get_io_type()) for i in schema.inputs if i.get_io_type() in sockets_types)
        outputs = tuple((o.display_name, o.get_io_type()) for o in schema.outputs)
        if (widgets, sockets, outputs) != (C.WIDGETS[kind], C.TARGETS[kind], C.OUTPUTS[kind]):
            problems.append([kind, list(widgets), [list(x) for x in sockets], [list(x) for x in outputs]])
    return problems


def node_checks(seed: int = 0) -> list:
    """The two nodes called as ComfyUI calls them (execute, validate_inputs) on a small SD1.5 UNet: the apply's
    model equals the engine's, its face_image is the photos for a non-FaceID file, the prep gives 224 px, and
    a bad layer_weights is refused at queue time. Returns the problems ([] when none)."""
    from safetensors.torch import save_file

    from omniid.comfy_host.folders import register_model_folders
    from omniid.comfy_host.ipadapter_plus import apply_ipadapter_plus
    from omniid.guidance.adapter_files import load_adapter
    register_model_folders()
    from omniid.nodes.ipadapter_plus_nodes import ApplyIPAdapterCompat, PrepImageForClipVision
    problems = []
    model, cv = unet("sd15", seed + 11), clip_vision(seed + 3)
    path = scratch_dir("omniid-ipa-node-") / "ip-adapter-plus_sd15.safetensors"
    save_file(L.flat(h94_file("plus", "sd15", cross_attention_widths(model), seed + 5)), str(path))
    adapter = load_adapter(str(path), path.name)
    photo = torch.rand(1, 150, 101, 3, generator=torch.Generator().manual_seed(seed + 29))
    prepped = PrepImageForClipVision.execute(image=photo, interpolation="BICUBIC", crop_position="pad",
                                             sharpening=0.2).result[0]
    if tuple(prepped.shape) != (1, 224, 224, 3):
        problems.append(f"prep gave {tuple(prepped.shape)}")
    options = dict(weight=0.8, weight_type="ease out", combine_embeds="concat", start_at=0.0, end_at=1.0,
                   embeds_scaling="K+V")
    out = ApplyIPAdapterCompat.execute(model=model, adapter=adapter, clip_vision=cv, image=prepped, **options).result
    direct, _ = apply_ipadapter_plus(model, adapter, cv, prepped, **options)
    g = torch.Generator().manual_seed(seed + 31)
    text, negative = torch.randn(1, 3, 64, generator=g), torch.randn(1, 3, 64, generator=g)
    difference = relative(sample(out[0], seed, text, negative, 2, 8), sample(direct, seed, text, negative, 2, 8))
    if difference > 1e-6:
        problems.append(f"the node's model differs from the engine's by {difference:.2e}")
    if not torch.equal(out[1], prepped):
        problems.append("face_image is not the photos for a Plus file")
    refused = ApplyIPAdapterCompat.validate_inputs(weight=1.0, weight_type="linear", layer_weights="3=1")
    if not (isinstance(refused, str) and "layer_weights" in refused):
        problems.append(f"layer_weights '3=1' was not refused at queue time: {refused!r}")
    if ApplyIPAdapterCompat.validate_inputs(weight=1.0, weight_type="linear", layer_weights="3:1") is not True:
        problems.append("a good layer_weights was refused")
    return problems
