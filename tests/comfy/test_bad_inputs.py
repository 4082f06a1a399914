"""Bad inputs through a real ComfyUI server, across every node family.

Each case must end in a validation or execution error whose text names the input, the server
must keep serving, and a normal prompt run right after must give the image it gave before
(bit for bit). The test-only node OmniTestValue (tests/comfy/fixture_nodes) hands sockets the
values no editor widget can make: 1-channel and empty images, NaN images and masks, masks of
odd shapes, other packs' objects.
"""
import json
import math

import numpy as np
import pytest

from omniid.cli.client import ComfyClient, ExecutionFailed, PromptRejected
from support.graph import Graph
from support.testing import images_of

SOCKETS = ("IMAGE", "MASK", "IDENTITY_EMBEDS", "IDENTITY_ADAPTER", "OMNI_ID_ENCODER", "FACE_ANALYSIS",
           "IDENTITY_DATASET", "FLAME_MODEL", "FLAME_PARAMS", "PIVOT_ENCODER", "CLIP_VISION", "MODEL", "VAE",
           "CONDITIONING")
NAN, INF = math.nan, math.inf
CLIP = "omniid_random_clip_vit_h.safetensors"
IDENTITY = "bad_inputs_identity.safetensors"        # written into input/ by the identity_file fixture


def value(g, socket, shape=(1, 64, 64, 3), fill=0.5):
    node = g.add("OmniTestValue", shape=json.dumps(list(shape)), fill=str(fill))
    return g.out(node, SOCKETS.index(socket))


def foreign(g, socket):
    return g.out(g.add("OmniTestValue", shape="[1]", fill="foreign"), SOCKETS.index(socket))


def faces(g):
    return g.out(g.add("OmniIdentityFaceAnalysisLoader", backend="dlib", provider="CPU", det_size=640))


def preview(g, image):
    g.add("PreviewImage", images=image)


# -- the families' graphs, valid unless an input is overridden ---------------------------------
def face_crop(**bad):
    g = Graph()
    inputs = dict(image=g.photos("obama.jpg"), face_analysis=faces(g), crop_size=128, padding=0.25,
                  selection="largest")
    crop = g.add("OmniIdentityFaceCrop", **{**inputs, **{k: v(g) if callable(v) else v for k, v in bad.items()}})
    preview(g, g.out(crop, 0))
    return g


def encode(node="OmniIdentityEncode", **bad):
    g = Graph()
    inputs = dict(encoder=g.out(g.add("OmniIdentityEncoderLoader", encoder_name="omniid_tiny_omni_id.safetensors")),
                  clip_vision=g.out(g.add("CLIPVisionLoader", clip_name=CLIP)), images=g.photos("id_1.png"))
    if node == "OmniIdentityEncodeBaseline":
        inputs = dict(method="clip", images=inputs["images"], clip_vision=inputs["clip_vision"])
    enc = g.add(node, **{**inputs, **{k: v(g) if callable(v) else v for k, v in bad.items()}})
    preview(g, g.out(enc, 1))
    return g


def embeds(g):
    return g.out(g.add("OmniIdentityLoadEmbeds", embeds_file=IDENTITY))


def adapted(node="OmniIdentityApplyAdapter", adapter="omniid_tiny_sd15_omni.safetensors", then=None, **bad):
    g = Graph()
    ckpt = g.checkpoint()
    inputs = dict(model=g.out(ckpt, 0), adapter=g.out(g.add("OmniIdentityAdapterLoader", adapter_name=adapter)),
                  embeds=embeds(g), weight=1.0, start_at=0.0, end_at=1.0)
    model = g.out(g.add(node, **{**inputs, **{k: v(g) if callable(v) else v for k, v in bad.pop("apply", {}).items()}}))
    if then:
        model = g.out(g.add(then, model=model, **{k: v(g) if callable(v) else v for k, v in bad.items()}))
    g.sd_sampling(model=model, ckpt=ckpt, steps=1, prefix="bad/adapted")
    return g


def rb(**bad):
    g = Graph()
    ckpt = g.checkpoint()
    pos = g.add("CLIPTextEncode", clip=g.out(ckpt, 1), text="a photo of a man")
    neg = g.add("CLIPTextEncode", clip=g.out(ckpt, 1), text="blurry")
    inputs = dict(model=g.out(ckpt, 0), positive=g.out(pos), negative=g.out(neg), cfg=5.0,
                  reference=g.photos("id_1.png"), vae=g.out(ckpt, 2), strength=8.5, start_fraction=0.6, t0=671,
                  feature_block=1, clip=g.out(ckpt, 1), prompt="a photo of a man")
    guider = g.add("OmniIdentityRBGuidance", **{**inputs, **{k: v(g) if callable(v) else v for k, v in bad.items()}})
    preview(g, g.out(guider, 1))
    return g


def similarity(**bad):
    g = Graph()
    inputs = dict(face_analysis=faces(g), images=g.photos("obama.jpg"), reference_images=g.photos("obama2.jpg"))
    sim = g.add("OmniIdentitySimilarity", **{**inputs, **{k: v(g) if callable(v) else v for k, v in bad.items()}})
    preview(g, g.out(sim, 0))
    return g


def flame_landmarks(**bad):
    g = Graph()
    inputs = dict(flame_model=lambda g: foreign(g, "FLAME_MODEL"), flame_params=lambda g: foreign(g, "FLAME_PARAMS"),
                  templates="grid 3x3", width=128, height=128, face_size=0.6, recenter=True, point_radius=2)
    inputs.update(bad)
    node = g.add("OmniIdentityFlameLandmarks", **{k: v(g) if callable(v) else v for k, v in inputs.items()})
    preview(g, g.out(node, 0))
    return g


def mtd(**bad):
    g = Graph()
    inputs = dict(dataset=lambda g: foreign(g, "IDENTITY_DATASET"), clip_vision=lambda g: foreign(g, "CLIP_VISION"),
                  encoder_size="tiny (1 cross + 1 self, 128 wide, 16 queries)",
                  decoder_size="tiny (1 cross + 1 self, 64 wide)", image_size=56, mask_ratio=0.95,
                  sampler="few_to_many", steps=1, lr=1e-4, batch=1, grad_accum=1, inputs_min=1, inputs_max=3,
                  targets=2, precision="fp32", seed=0, run_name="bad", resume=False, save_every=0)
    inputs.update(bad)
    node = g.add("OmniIdentityTrainEncoderMTD", **{k: v(g) if callable(v) else v for k, v in inputs.items()})
    preview(g, g.out(node, 1))
    return g


def build_dataset(**bad):
    g = Graph()
    inputs = dict(images=g.photos("id_1.png"), face_analysis=faces(g), name="bad_inputs", photos_per_identity=8,
                  pose_clusters=16, min_pose_difference=15.0, drop_fraction=0.2, similarity_threshold=-1.0,
                  crop_size=448)
    node = g.add("OmniIdentityBuildDataset", **{**inputs, **bad})
    g.add("PreviewAny", source=g.out(node, 1))
    return g


def save_encoder(**bad):
    g = Graph()
    g.add("OmniIdentitySaveEncoder", **{k: v(g) if callable(v) else v for k, v in bad.items()})
    return g


def combine(**bad):
    g = Graph()
    inputs = dict(embeds_1=embeds, embeds_2=embeds, mode="average")
    inputs.update(bad)
    node = g.add("OmniIdentityCombineEmbeds", **{k: v(g) if callable(v) else v for k, v in inputs.items()})
    g.add("OmniIdentitySaveEmbeds", embeds=g.out(node), filename_prefix="bad/combined")
    return g


def save_embeds(prefix):
    g = Graph()
    g.add("OmniIdentitySaveEmbeds", embeds=embeds(g), filename_prefix=prefix)
    return g


CASES = {
    # face analysis and crops
    "face_crop_grey_image": (lambda: face_crop(image=lambda g: value(g, "IMAGE", (1, 64, 64, 1))), "image"),
    "face_crop_empty_image": (lambda: face_crop(image=lambda g: value(g, "IMAGE", (1, 0, 0, 3))), "image"),
    "face_crop_nan_padding": (lambda: face_crop(padding=NAN), "padding"),
    "face_crop_tiny_crop_size": (lambda: face_crop(crop_size=5), "crop_size"),
    "face_crop_unknown_selection": (lambda: face_crop(selection="random"), "selection"),
    "face_crop_foreign_analyser": (lambda: face_crop(face_analysis=lambda g: foreign(g, "FACE_ANALYSIS")),
                                   "face_analysis"),
    "face_loader_unknown_backend": (lambda: face_crop(face_analysis=lambda g: g.out(g.add(
        "OmniIdentityFaceAnalysisLoader", backend="insightface/nope", provider="CPU", det_size=640))), "backend"),
    # encoders and embeds
    "encode_nan_photo": (lambda: encode(images=lambda g: value(g, "IMAGE", (1, 224, 224, 3), NAN)), "images"),
    "encode_foreign_encoder": (lambda: encode(encoder=lambda g: foreign(g, "OMNI_ID_ENCODER")), "encoder"),
    "encode_infinite_padding": (lambda: encode(padding=INF), "padding"),
    "encode_baseline_unknown_method": (lambda: encode("OmniIdentityEncodeBaseline", method="magic"), "method"),
    "encode_baseline_arcface_without_faces": (lambda: encode("OmniIdentityEncodeBaseline", method="arcface"),
                                              "face_analysis"),
    "encoder_loader_missing_file": (lambda: encode(encoder=lambda g: g.out(g.add(
        "OmniIdentityEncoderLoader", encoder_name="not_there.safetensors"))), "encoder_name"),
    "combine_nan_weight": (lambda: combine(weight_1=NAN), "weight_1"),
    "combine_foreign_embeds": (lambda: combine(embeds_2=lambda g: foreign(g, "IDENTITY_EMBEDS")), "embeds_2"),
    "combine_unknown_mode": (lambda: combine(mode="median"), "mode"),
    "save_embeds_path_escape": (lambda: save_embeds("../../outside/identity"), "filename_prefix"),
    # identity adapter
    "adapter_nan_weight": (lambda: adapted(apply=dict(weight=NAN)), "weight"),
    "adapter_nan_start": (lambda: adapted(apply=dict(start_at=NAN)), "start_at"),
    "adapter_window_out_of_range": (lambda: adapted(apply=dict(start_at=-3.0, end_at=7.0)), "start_at"),
    "adapter_window_reversed": (lambda: adapted(apply=dict(start_at=0.8, end_at=0.2)), "start_at"),
    "adapter_infinite_block_weight": (lambda: adapted(apply=dict(blocks="all=1e999")), "blocks"),
    "adapter_garbled_blocks": (lambda: adapted(apply=dict(blocks="most=2")), "blocks"),
    "adapter_mask_of_five_dimensions": (lambda: adapted(apply=dict(
        attn_mask=lambda g: value(g, "MASK", (1, 1, 1, 8, 8)))), "attn_mask"),
    "adapter_nan_mask": (lambda: adapted(apply=dict(attn_mask=lambda g: value(g, "MASK", (1, 64, 64), NAN))),
                         "attn_mask"),
    "adapter_foreign_embeds": (lambda: adapted(apply=dict(embeds=lambda g: foreign(g, "IDENTITY_EMBEDS"))), "embeds"),
    "adapter_foreign_adapter": (lambda: adapted(apply=dict(adapter=lambda g: foreign(g, "IDENTITY_ADAPTER"))),
                                "adapter"),
    "adapter_unknown_flux_inject": (lambda: adapted(apply=dict(flux_inject="everywhere")), "flux_inject"),
    "adapter_loader_missing_file": (lambda: adapted(adapter="not_there.safetensors"), "adapter_name"),
    "adapter_nan_faceid_scale": (lambda: adapted(apply=dict(faceid_v2_scale=NAN)), "faceid_v2_scale"),
    # Infinite-ID
    "mixed_attention_nan_weight": (lambda: adapted("OmniIdentityMixedAttention", apply=dict(weight=NAN)), "weight"),
    "mixed_attention_unknown_stream": (lambda: adapted("OmniIdentityMixedAttention",
                                                       apply=dict(text_stream="sideways")), "text_stream"),
    "adain_strength_out_of_range": (lambda: adapted("OmniIdentityMixedAttention", then="OmniIdentityAdaINMean",
                                                    strength=2.0), "strength"),
    "adain_without_mixed_attention": (lambda: adapted(then="OmniIdentityAdaINMean", strength=1.0), "model"),
    # RB-Guidance
    "rb_reference_of_four_pixels": (lambda: rb(reference=lambda g: value(g, "IMAGE", (1, 4, 4, 3))), "reference"),
    "rb_nan_strength": (lambda: rb(strength=NAN), "strength"),
    "rb_start_fraction_out_of_range": (lambda: rb(start_fraction=1.5), "start_fraction"),
    "rb_subject_token_out_of_range": (lambda: rb(subject_token=300), "subject_token"),
    "rb_unknown_mask_source": (lambda: rb(mask_source="psychic"), "mask_source"),
    "rb_nan_reference_mask": (lambda: rb(reference_mask=lambda g: value(g, "MASK", (1, 512, 512), NAN)),
                              "reference_mask"),
    "rb_subject_not_in_prompt": (lambda: rb(subject="giraffe"), "subject"),
    # metrics
    "similarity_nan_images": (lambda: similarity(images=lambda g: value(g, "IMAGE", (1, 64, 64, 3), INF)), "images"),
    "similarity_foreign_analyser": (lambda: similarity(face_analysis=lambda g: foreign(g, "FACE_ANALYSIS")),
                                    "face_analysis"),
    # FLAME
    "flame_landmarks_foreign_model": (lambda: flame_landmarks(), "flame_model"),
    "flame_landmarks_nan_yaw": (lambda: flame_landmarks(yaw=NAN), "yaw"),
    "flame_landmarks_unknown_templates": (lambda: flame_landmarks(templates="bogus"), "templates"),
    # training
    "mtd_inputs_reversed": (lambda: mtd(inputs_min=3, inputs_max=1), "inputs_min"),
    "mtd_nan_learning_rate": (lambda: mtd(lr=NAN), "lr"),
    "mtd_mask_ratio_out_of_range": (lambda: mtd(mask_ratio=1.5), "mask_ratio"),
    "mtd_foreign_dataset": (lambda: mtd(), "dataset"),
    "build_dataset_nan_drop_fraction": (lambda: build_dataset(drop_fraction=NAN), "drop_fraction"),
    "build_dataset_path_escape": (lambda: build_dataset(name="../escape"), "name"),
    "save_encoder_foreign_encoder": (lambda: save_encoder(encoder=lambda g: foreign(g, "OMNI_ID_ENCODER"),
                                                          filename_prefix="bad/encoder"), "encoder"),
}


def normal_prompt() -> tuple[dict, str]:
    """A sampling prompt with an identity adapter whose nodes all run again each time (the checkpoint
    loader stays cached: OmniTestRerun is never cached)."""
    g = adapted(apply=dict(weight=0.8, model=lambda g: g.out(g.add("OmniTestRerun", model=g.out("1", 0)))))
    save = next(n for n, node in g.nodes.items() if node["class_type"] == "SaveImage")
    return g.nodes, save


@pytest.fixture(scope="module")
def identity_file(comfy_server):
    """An Omni-ID identity for the omni adapter, made by the pack's own file writer (no CLIP run needed)."""
    import torch
    from omniid.encoders.embeds import IdentityEmbeds, save_embeds
    tokens = torch.randn(16, 1280, generator=torch.Generator().manual_seed(0))
    save_embeds(IdentityEmbeds("omni_id", {"tokens": tokens}, {"num_images": 1}),
                str(comfy_server.base_directory / "input" / IDENTITY))
    return IDENTITY


@pytest.fixture(scope="module")
def reference_image(comfy_server, identity_file):
    client = ComfyClient(comfy_server.url)
    prompt, save = normal_prompt()
    return images_of(client, client.run(prompt, timeout=600), save)[0]


def error_text(client, prompt) -> str:
    try:
        client.run(prompt, timeout=600)
    except PromptRejected as exc:
        return str(exc)
    except ExecutionFailed as exc:
        return f"{exc} {exc.error.get('exception_message', '')}"
    raise AssertionError("the prompt was accepted and ran")


def test_at_least_forty_bad_inputs_across_every_family():
    families = {name.split("_")[0] for name in CASES}
    assert len(CASES) >= 40 and {"face", "encode", "adapter", "rb", "flame", "mtd", "similarity"} <= families


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_named_and_the_server_keeps_its_results(comfy, comfy_server, reference_image, identity_file,
                                                             case):
    build, input_name = CASES[case]
    text = error_text(comfy, build().nodes)
    assert input_name in text, text
    assert "Traceback" not in text
    assert comfy_server.alive(), comfy_server.log_tail()
    prompt, save = normal_prompt()
    result = comfy.run(prompt, timeout=600)
    assert next(n for n, node in prompt.items() if node["class_type"] == "KSampler") not in result.cached_nodes()
    again = images_of(comfy, result, save)[0]
    assert np.array_equal(again, reference_image), f"{case}: the next normal prompt changed"
