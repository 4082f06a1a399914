"""Test-only custom nodes, loaded only into the test servers' custom_nodes, never shipped with the pack.

``OmniTestValue`` outputs, on every socket type the pack takes, either a tensor of the asked
shape filled with a number, NaN or Inf, or an object of another pack (a dict): values the pack
must refuse. ``OmniTestRerun`` passes a model through and is never cached, so the nodes after
it run again on every prompt while the checkpoint loader before it stays cached.
``OmniTestFluxText`` stands in for CLIP Text Encode on FLUX's CLIP-L + T5-XXL: ComfyUI builds
T5-XXL at full size whatever the file holds (about 40 s to load and over a minute per prompt on
a 2-core CPU), so most FLUX graphs in the tests get a conditioning of FLUX's layout
(tokens x 4096, pooled 768) drawn from the text instead; one test keeps the real encoders.
"""
import json
import zlib

import torch

SOCKETS = ("IMAGE", "MASK", "IDENTITY_EMBEDS", "IDENTITY_ADAPTER", "OMNI_ID_ENCODER", "FACE_ANALYSIS",
           "IDENTITY_DATASET", "FLAME_MODEL", "FLAME_PARAMS", "PIVOT_ENCODER", "CLIP_VISION", "MODEL", "VAE",
           "CONDITIONING")


class OmniTestValue:
    CATEGORY = "testing"
    RETURN_TYPES = SOCKETS
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"shape": ("STRING", {"default": "[1, 64, 64, 3]"}),
                             "fill": ("STRING", {"default": "0.5"})}}

    def make(self, shape, fill):
        if fill == "foreign":
            value = {"made_by": "another pack", "tensors": None}
        else:
            value = torch.full(json.loads(shape), float(fill), dtype=torch.float32)
        return tuple(value for _ in SOCKETS)


class OmniTestRerun:
    CATEGORY = "testing"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "passthrough"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    @classmethod
    def IS_CHANGED(cls, model):
        return float("nan")              # never equal to itself: always runs again

    def passthrough(self, model):
        return (model,)


class OmniTestFluxText:
    CATEGORY = "testing"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"multiline": True}),
                             "tokens": ("INT", {"default": 8, "min": 1, "max": 512})}}

    def encode(self, text, tokens):
        generator = torch.Generator().manual_seed(zlib.crc32(text.encode("utf-8")))
        context = torch.randn(1, tokens, 4096, generator=generator)
        pooled = torch.randn(1, 768, generator=generator)
        return ([[context, {"pooled_output": pooled}]],)


NODE_CLASS_MAPPINGS = {"OmniTestValue": OmniTestValue, "OmniTestRerun": OmniTestRerun,
                       "OmniTestFluxText": OmniTestFluxText}
