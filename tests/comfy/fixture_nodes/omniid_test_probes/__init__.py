"""Test-only probes, loaded only into the test servers' custom_nodes, never shipped with the pack.

``OmniTestModelInfo`` reports what ComfyUI's loaders built, read from the objects themselves (not
from ComfyUI's log): the model's prediction type (``model_type``: EPS, V_PREDICTION, FLOW ...), the
supported-model class its detection chose with its base classes (SD15, KOALA_700M < SDXL ...), the
model class built from it (BaseModel, SDXL, Flux ...) and the text encoder class.
"""
import json


class OmniTestModelInfo:
    CATEGORY = "testing"
    RETURN_TYPES = ()
    FUNCTION = "describe"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}, "optional": {"clip": ("CLIP",)}}

    def describe(self, model, clip=None):
        info = {"model_type": model.model.model_type.name, "model_class": type(model.model).__name__,
                "model_config": [c.__name__ for c in type(model.model.model_config).__mro__[:-1]]}
        if clip is not None:
            info["text_encoder"] = type(clip.cond_stage_model).__name__
        return {"ui": {"text": [json.dumps(info)]}}


NODE_CLASS_MAPPINGS = {"OmniTestModelInfo": OmniTestModelInfo}
