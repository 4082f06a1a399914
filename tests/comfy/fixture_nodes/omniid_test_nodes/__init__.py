"""Test-only custom nodes, loaded only into the test servers' custom_nodes, never shipped with the pack.

``OmniTestValue`` outputs, on every socket type the pack takes, either a tensor of the asked
shape filled with a number, NaN or Inf, or an object of another pack (a dict): values the pack
must refuse. ``OmniTestRerun`` passes a model through and is never cached, so the nodes after
it run again on every prompt while the checkpoint loader before it stays cached.
``OmniTestFluxText`` stands in for CLIP Text Encode on FLUX's CLIP-L + T5-XXL: ComfyUI builds
T5-XXL at full size whatever the file holds (about 40 s to load and over a minute per prompt on
a 2-core CPU), so most FLUX graphs in the tests get a conditioning of FLUX's layout
(tokens x 4096, pooled 768) drawn from the text instead; one test keeps the real encoders.
``OmniTestDigest`` shows the dtypes and a SHA-256 of the tensors of any object it is given (a
module, a LoadedEncoder, a tensor): equal digests mean the object was not modified. Its ``after``
input only orders it after another node.
"""
import hashlib
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


def _tensors(value) -> dict:
    if torch.is_tensor(value):
        return {"": value}
    module = getattr(value, "model", value)          # LoadedEncoder holds its module in .model
    if isinstance(module, torch.nn.Module):
        return module.state_dict()
    raise TypeError(f"OmniTestDigest cannot read a {type(value).__name__}")


class OmniTestDigest:
    CATEGORY = "testing"
    RETURN_TYPES = ()
    FUNCTION = "digest"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("*",)}, "optional": {"after": ("*",)}}

    @classmethod
    def VALIDATE_INPUTS(cls, input_types):
        return True                      # any socket type

    def digest(self, value, after=None):
        sha = hashlib.sha256()
        dtypes = set()
        for name, tensor in sorted(_tensors(value).items()):
            sha.update(name.encode())
            sha.update(str(tensor.dtype).encode())
            sha.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            dtypes.add(str(tensor.dtype).replace("torch.", ""))
        return {"ui": {"text": [json.dumps({"dtypes": sorted(dtypes), "sha256": sha.hexdigest()})]}}


NODE_CLASS_MAPPINGS = {"OmniTestDigest": OmniTestDigest, "OmniTestValue": OmniTestValue, "OmniTestRerun": OmniTestRerun,
                       "OmniTestFluxText": OmniTestFluxText}
