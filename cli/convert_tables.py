"""What `python -m omniid convert` maps: IPAdapter_plus 9d076a3d's nodes (their widget order, defaults, presets'
files, what has no counterpart yet) and how the editor lays out this pack's nodes (sockets, widgets, outputs;
tests/comfy/test_ipadapter_plus_compat.py checks them against the nodes' schemas)."""
from __future__ import annotations

COMPAT = "OmniIdentityApplyIPAdapterCompat"
ADAPTER_LOADER = "OmniIdentityAdapterLoader"
FACE_LOADER = "OmniIdentityFaceAnalysisLoader"
CLIP_LOADER = "CLIPVisionLoader"
PREP = "OmniIdentityPrepImageForClipVision"
NOISE = "OmniIdentityIPAdapterNoise"
NOISE_TYPES = ("fade", "dissolve", "gaussian")      # IPAdapter Noise's types the pack makes ("shuffle" stays)

# IPAdapter_plus's widget inputs per node, in its INPUT_TYPES order (older saves may lack trailing ones)
IPA_WIDGETS = {
    "IPAdapter": ("weight", "start_at", "end_at", "weight_type"),
    "IPAdapterAdvanced": ("weight", "weight_type", "combine_embeds", "start_at", "end_at", "embeds_scaling"),
    "IPAdapterFaceID": ("weight", "weight_faceidv2", "weight_type", "combine_embeds", "start_at", "end_at",
                        "embeds_scaling"),
    "IPAdapterPreciseStyleTransfer": ("weight", "style_boost", "combine_embeds", "start_at", "end_at",
                                      "embeds_scaling"),
    "IPAdapterPreciseComposition": ("weight", "composition_boost", "combine_embeds", "start_at", "end_at",
                                    "embeds_scaling"),
    "IPAdapterStyleComposition": ("weight_style", "weight_composition", "expand_style", "combine_embeds", "start_at",
                                  "end_at", "embeds_scaling"),
    "IPAdapterMS": ("weight", "weight_faceidv2", "weight_type", "combine_embeds", "start_at", "end_at",
                    "embeds_scaling", "layer_weights"),
    "IPAdapterModelLoader": ("ipadapter_file",),
    "IPAdapterUnifiedLoader": ("preset",),
    "IPAdapterUnifiedLoaderFaceID": ("preset", "lora_strength", "provider"),
    "IPAdapterUnifiedLoaderCommunity": ("preset",),
    "IPAdapterInsightFaceLoader": ("provider", "model_name"),
    "PrepImageForClipVision": ("interpolation", "crop_position", "sharpening"),
    "IPAdapterNoise": ("type", "strength", "blur"),
}
IPA_DEFAULTS = {"weight": 1.0, "start_at": 0.0, "end_at": 1.0, "weight_type": "linear", "combine_embeds": "concat",
                "embeds_scaling": "V only", "weight_faceidv2": 1.0, "style_boost": 1.0, "composition_boost": 0.0,
                "lora_strength": 0.6, "provider": "CPU", "model_name": "buffalo_l", "layer_weights": "",
                "interpolation": "LANCZOS", "crop_position": "top", "sharpening": 0.0,
                "weight_style": 1.0, "expand_style": False, "weight_composition": 1.0, "type": "fade",
                "strength": 1.0, "blur": 0}
APPLY_TYPES = ("IPAdapter", "IPAdapterAdvanced", "IPAdapterFaceID", "IPAdapterPreciseStyleTransfer",
               "IPAdapterPreciseComposition", "IPAdapterMS", "IPAdapterStyleComposition")
LOADER_TYPES = ("IPAdapterModelLoader", "IPAdapterUnifiedLoader", "IPAdapterUnifiedLoaderFaceID",
                "IPAdapterUnifiedLoaderCommunity")
# sockets of IPAdapter_plus's apply nodes -> the compatible node's
APPLY_SOCKETS = {"model": "model", "image": "image", "image_negative": "image_negative", "attn_mask": "attn_mask",
                 "clip_vision": "clip_vision", "insightface": "face_analysis", "image_style": "image",
                 "image_composition": "image_composition"}

# the pack's nodes as the editor lays them out: socket inputs, widget inputs (in order), outputs
TARGETS = {
    COMPAT: (("model", "MODEL"), ("adapter", "IDENTITY_ADAPTER"), ("clip_vision", "CLIP_VISION"), ("image", "IMAGE"),
             ("image_negative", "IMAGE"), ("image_composition", "IMAGE"), ("attn_mask", "MASK"),
             ("face_analysis", "FACE_ANALYSIS")),
    ADAPTER_LOADER: (),
    PREP: (("image", "IMAGE"),),
    NOISE: (("image", "IMAGE"),),
    FACE_LOADER: (),
    CLIP_LOADER: (),
}
WIDGETS = {
    COMPAT: ("weight", "weight_type", "combine_embeds", "start_at", "end_at", "embeds_scaling", "weight_faceidv2",
             "weight_composition", "boost", "faceid_lora", "faceid_lora_strength", "layer_weights"),
    ADAPTER_LOADER: ("adapter_name",),
    FACE_LOADER: ("backend", "provider", "det_size", "dlib_detector", "arcface_model"),
    CLIP_LOADER: ("clip_name",),
    PREP: ("interpolation", "crop_position", "sharpening"),
    NOISE: ("type", "strength", "blur"),
}
OUTPUTS = {COMPAT: (("model", "MODEL"), ("face_image", "IMAGE")), ADAPTER_LOADER: (("adapter", "IDENTITY_ADAPTER"),),
           FACE_LOADER: (("face_analysis", "FACE_ANALYSIS"),), CLIP_LOADER: (("CLIP_VISION", "CLIP_VISION"),),
           PREP: (("image", "IMAGE"),), NOISE: (("image", "IMAGE"),)}
TITLES = {COMPAT: "Apply IP-Adapter, IPAdapter_plus compatible (OmniIdentity)",
          ADAPTER_LOADER: "Identity Adapter Loader (OmniIdentity)", FACE_LOADER: "Face Analysis Loader (OmniIdentity)",
          CLIP_LOADER: "Load CLIP Vision", PREP: "Prep Image For CLIP Vision (OmniIdentity)",
          NOISE: "IPAdapter Noise (OmniIdentity)"}

CLIP_H, CLIP_G, CLIP_336 = ("CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors", "CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors",
                            "clip-vit-large-patch14-336.bin")
# preset (lower case prefix) -> (SD1.5 file, SDXL file, CLIP vision)
PRESETS = (
    ("light", ("ip-adapter_sd15_light_v11.bin", None, CLIP_H)),
    ("standard", ("ip-adapter_sd15.safetensors", "ip-adapter_sdxl_vit-h.safetensors", CLIP_H)),
    ("vit-g", ("ip-adapter_sd15_vit-G.safetensors", "ip-adapter_sdxl.safetensors", CLIP_G)),
    ("plus (", ("ip-adapter-plus_sd15.safetensors", "ip-adapter-plus_sdxl_vit-h.safetensors", CLIP_H)),
    ("plus face", ("ip-adapter-plus-face_sd15.safetensors", "ip-adapter-plus-face_sdxl_vit-h.safetensors", CLIP_H)),
    ("full", ("ip-adapter-full-face_sd15.safetensors", None, CLIP_H)),
    ("faceid portrait unnorm", (None, "ip-adapter-faceid-portrait_sdxl_unnorm.bin", CLIP_H)),
    ("faceid portrait", ("ip-adapter-faceid-portrait-v11_sd15.bin", "ip-adapter-faceid-portrait_sdxl.bin", CLIP_H)),
    ("faceid plus v2", ("ip-adapter-faceid-plusv2_sd15.bin", "ip-adapter-faceid-plusv2_sdxl.bin", CLIP_H)),
    ("faceid plus -", ("ip-adapter-faceid-plus_sd15.bin", None, CLIP_H)),
    ("faceid", ("ip-adapter-faceid_sd15.bin", "ip-adapter-faceid_sdxl.bin", CLIP_H)),
    ("composition", ("ip_plus_composition_sd15.safetensors", "ip_plus_composition_sdxl.safetensors", CLIP_H)),
    ("kolors", (None, "Kolors-IP-Adapter-Plus.bin", CLIP_336)),
)
LORA_PRESETS = ("faceid", "faceid plus -", "faceid plus v2")     # presets whose loader applies the FaceID LoRA

UNSUPPORTED = {
    "IPAdapterBatch": "unfold batch (one image per latent of the batch) is not in the pack yet",
    "IPAAdapterFaceIDBatch": "unfold batch (one image per latent of the batch) is not in the pack yet",
    "IPAdapterTiled": "tiled encoding of large or non-square references is not in the pack yet",
    "IPAdapterTiledBatch": "tiled encoding and unfold batch are not in the pack yet",
    "IPAdapterEmbeds": "IPAdapter_plus's EMBEDS pipeline (IPAdapter Encoder / Combine Embeds) has no converter yet",
    "IPAdapterEmbedsBatch": "IPAdapter_plus's EMBEDS pipeline and unfold batch have no converter yet",
    "IPAdapterEncoder": "IPAdapter_plus's EMBEDS pipeline (weighted encodes) has no converter yet",
    "IPAdapterCombineEmbeds": "IPAdapter_plus's EMBEDS pipeline has no converter yet",
    "IPAdapterSaveEmbeds": "IPAdapter_plus's pickled .ipadpt embeds are not read (the pack never loads pickles)",
    "IPAdapterLoadEmbeds": "IPAdapter_plus's pickled .ipadpt embeds are not read (the pack never loads pickles)",
    "IPAdapterStyleCompositionBatch": "a separate composition image and unfold batch are not in the pack yet",
    "IPAdapterClipVisionEnhancer": "the tiled CLIP vision enhancer is not in the pack yet",
    "IPAdapterClipVisionEnhancerBatch": "the tiled CLIP vision enhancer and unfold batch are not in the pack yet",
    "IPAdapterFromParams": "IPADAPTER_PARAMS (regional conditioning) are not in the pack yet",
    "IPAdapterRegionalConditioning": "IPADAPTER_PARAMS (regional conditioning) are not in the pack yet",
    "IPAdapterCombineParams": "IPADAPTER_PARAMS (regional conditioning) are not in the pack yet",
    "IPAdapterFaceIDKolors": "Kolors FaceID (its ChatGLM UNet's encoder_hid_proj inside the adapter) is not in the pack yet",
    "IPAdapterNoise": "IPAdapter Noise's 'shuffle' (torchvision's random elastic transform) is not in the pack yet",
    "IPAdapterWeights": "frame weight schedules (AnimateDiff) are not in the pack yet",
    "IPAdapterWeightsFromStrategy": "frame weight schedules (AnimateDiff) are not in the pack yet",
    "IPAdapterPromptScheduleFromWeightsStrategy": "frame weight schedules (AnimateDiff) are not in the pack yet",
    "IPAdapterCombineWeights": "frame weight schedules (AnimateDiff) are not in the pack yet",
}
IPA_TYPES = set(IPA_WIDGETS) | set(UNSUPPORTED)
