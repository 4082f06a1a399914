"""Several people in one image: one identity per face region of a layout photo, in a real ComfyUI."""
import numpy as np
import pytest
import torch
from PIL import Image

from support.graph import Graph
from support.testing import images_of

IDENTITIES = ("two_people_a.safetensors", "two_people_b.safetensors")


@pytest.fixture(scope="module")
def identities(comfy_server):
    from omniid.encoders.embeds import IdentityEmbeds, save_embeds
    for seed, name in enumerate(IDENTITIES):
        tokens = torch.randn(16, 1280, generator=torch.Generator().manual_seed(10 + seed)) * 3
        save_embeds(IdentityEmbeds("omni_id", {"tokens": tokens}, {"num_images": 1}),
                    str(comfy_server.base_directory / "input" / name))
    return IDENTITIES


def regions_graph(people: list[tuple[str, int, float]]):
    """Layout faces -> one ApplyAdapter per (identity file, face number, weight) -> sampling at the layout's
    aspect, the two face masks saved too; returns (graph, save node)."""
    g = Graph()
    faces = g.add("OmniIdentityFaceCrop", image=g.photos("two_people.png"),
                  face_analysis=g.out(g.add("OmniIdentityFaceAnalysisLoader", backend="dlib", provider="CPU",
                                            det_size=640)), crop_size=224, padding=0.25, selection="all")
    masks = {n: g.add("OmniIdentityFaceMask", faces=g.out(faces, 2), face=n, grow=0.1, feather=0) for n in (1, 2)}
    ckpt = g.checkpoint()
    model = g.out(ckpt, 0)
    adapter = g.out(g.add("OmniIdentityAdapterLoader", adapter_name="omniid_tiny_sd15_omni.safetensors"))
    for identity, face, weight in people:
        model = g.out(g.add("OmniIdentityApplyAdapter", model=model, adapter=adapter,
                            embeds=g.out(g.add("OmniIdentityLoadEmbeds", embeds_file=identity)), weight=weight,
                            start_at=0.0, end_at=1.0, attn_mask=g.out(masks[face])))
    ids = g.sd_sampling(model=model, ckpt=ckpt, steps=3, size=64, prefix="two/people")
    g.nodes[g.nodes[ids["sampler"]]["inputs"]["latent_image"][0]]["inputs"].update(width=128, height=64)
    for n, mask in masks.items():
        g.add("SaveImage", images=g.out(g.add("MaskToImage", mask=g.out(mask))), filename_prefix=f"two/mask{n}")
    return g, ids["save"]


def run(comfy, people):
    g, save = regions_graph(people)
    result = comfy.run(g.nodes, timeout=600)
    masks = {n: next(node_id for node_id, node in g.nodes.items() if node["class_type"] == "SaveImage"
                     and node["inputs"]["filename_prefix"] == f"two/mask{n}") for n in (1, 2)}
    image = images_of(comfy, result, save)[0].astype(np.float64)
    regions = {n: images_of(comfy, result, node_id)[0][..., 0] > 127 for n, node_id in masks.items()}
    return image, regions


def region_means(difference: np.ndarray, regions: dict) -> dict:
    small = {n: np.asarray(Image.fromarray(r.astype(np.uint8) * 255).resize(difference.shape[1::-1])) > 127
             for n, r in regions.items()}
    return {n: float(difference[m].mean()) for n, m in small.items()}


def test_each_identity_acts_in_its_own_face_region(comfy, identities):
    a, b = identities
    plain, regions = run(comfy, [])
    both, _ = run(comfy, [(a, 1, 1.0), (b, 2, 1.0)])
    swapped, _ = run(comfy, [(b, 1, 1.0), (a, 2, 1.0)])
    only_a, _ = run(comfy, [(a, 1, 1.0)])
    b_off, _ = run(comfy, [(a, 1, 1.0), (b, 2, 0.0)])
    assert regions[1].any() and regions[2].any() and not (regions[1] & regions[2]).any()
    # weight 0 on one identity: exactly the single-identity image
    assert np.array_equal(b_off, only_a)
    # adding identity B changes face 2's region far more than face 1's
    added_b = region_means(np.abs(both - only_a).mean(-1), regions)
    assert added_b[2] > 2 * added_b[1], added_b
    # identity A alone changes face 1's region far more than face 2's
    added_a = region_means(np.abs(only_a - plain).mean(-1), regions)
    assert added_a[1] > 2 * added_a[2], added_a
    # swapping the identities changes each face region at least half as much as putting an identity there
    # does, and the background, outside both regions, less (it changes through the UNet's convolutions and
    # self-attention, not through the masked identity attention)
    background = {0: ~(regions[1] | regions[2])}
    swap = region_means(np.abs(both - swapped).mean(-1), {**regions, **background})
    assert swap[1] > 0.5 * added_a[1] and swap[2] > 0.5 * added_b[2], (swap, added_a, added_b)
    assert min(swap[1], swap[2]) > 1.25 * swap[0], (swap, added_a, added_b)


def test_overlapping_regions_are_reported(comfy, identities):
    g, _ = regions_graph([(identities[0], 1, 1.0), (identities[1], 1, 1.0)])
    result = comfy.run(g.nodes, timeout=600)
    appliers = [n for n, node in g.nodes.items() if node["class_type"] == "OmniIdentityApplyAdapter"]
    text = "".join(result.outputs[appliers[1]]["text"])
    assert "overlaps the region of an identity applied before by 100%" in text

