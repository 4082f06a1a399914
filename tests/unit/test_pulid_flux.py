"""PuLID-FLUX without ComfyUI: the published key layout, the identity tokens and one cross-attention
residual equal to the authors' IDFormer / PerceiverAttentionCA (their code, from the vendored archive)
on identical random weights, to float32 round-off; several photos; wrong files refused clearly."""
import pytest
import torch

from omniid.encoders import pulid_flux as P
from omniid.guidance.pulid_flux import pulid_residual
from support.pulid_reference import TINY, condition, reference_pulid, relative

HIDDEN = 64


@pytest.fixture(scope="module")
def pair():
    encoder, cas, state = reference_pulid(num_ca=2, flux_hidden=HIDDEN, seed=0)
    return encoder, cas, state, P.load_state(state, "tiny")


def test_the_published_layout_loads_with_its_sizes(pair):
    *_, state, ours = pair
    assert set(ours.state_dict()) == set(state)
    c = ours.config
    assert (c.dim, c.depth, c.heads, c.dim_head, c.num_queries, c.output_dim, c.num_ca, c.ca_dim, c.ca_heads) == (
        TINY["dim"], 5, 2, 64, 8, 48, 2, HIDDEN, 1, )
    # the published FLUX.1 file: 10 double + 10 single injections
    assert len(P.injection_points(19, 38)) == P.PuLIDFluxConfig().num_ca == 20


def test_identity_tokens_equal_the_authors_idformer(pair):
    encoder, _, _, ours = pair
    id_cond, hidden = condition(photos=2)
    with torch.no_grad():
        expected = encoder(id_cond, hidden)
    got = ours.identity_tokens(id_cond, hidden)
    assert got.shape == (2, TINY["num_queries"], TINY["output_dim"])
    assert relative(got, expected) <= 1e-5


def test_one_cross_attention_residual_equals_the_authors(pair):
    encoder, cas, _, ours = pair
    id_cond, hidden = condition(photos=1)
    g = torch.Generator().manual_seed(5)
    image = torch.randn(2, 24, HIDDEN, generator=g)
    with torch.no_grad():
        tokens = encoder(id_cond, hidden)
        for index in range(2):
            expected = cas[index](tokens, image)
            assert relative(pulid_residual(ours.pulid_ca[index], tokens, image), expected) <= 1e-5


def test_several_photos_average_their_tokens_and_uncond_is_the_zero_input(pair):
    encoder, _, _, ours = pair
    id_cond, hidden = condition(photos=3)
    cond, uncond = P.identity_tokens(ours, id_cond, hidden)
    with torch.no_grad():
        per_photo = encoder(id_cond, hidden)
        zero = encoder(torch.zeros(1, 1280), [torch.zeros(1, 17, 1024)] * 5)
    assert relative(cond, per_photo.mean(0, keepdim=True)) <= 1e-5
    assert relative(uncond, zero) <= 1e-5
    concat, _ = P.identity_tokens(ours, id_cond, hidden, combine="concat")
    with torch.no_grad():    # the IDFormer's own several-embedding path (num_duotu)
        expected = encoder(id_cond[None], [h.reshape(1, -1, 1024) for h in hidden])
    assert relative(concat, expected) <= 1e-5


def test_a_saved_file_round_trips_with_its_head_counts(pair, tmp_path):
    *_, ours = pair
    path = str(tmp_path / "pulid_tiny.safetensors")
    P.save_file(ours, path)
    again = P.load_file(path)
    assert again.config == ours.config
    id_cond, hidden = condition(photos=1)
    assert torch.equal(again.identity_tokens(id_cond, hidden), ours.identity_tokens(id_cond, hidden))


def test_wrong_files_are_refused_saying_what_they_are(pair, tmp_path):
    *_, state, _ = pair
    from safetensors.torch import save_file
    with pytest.raises(P.PuLIDFileError, match="not a PuLID-FLUX checkpoint"):
        P.load_state({"ip_adapter.1.to_k_ip.weight": torch.zeros(4, 4)}, "ip.safetensors")
    broken = dict(state)
    broken["pulid_ca.0.to_q.weight"] = torch.zeros(3, 3)
    with pytest.raises(P.PuLIDFileError, match="wrong shapes|layout"):
        P.load_state(broken, "broken")
    with pytest.raises(P.PuLIDFileError, match="keys a PuLID-FLUX checkpoint does not"):
        P.load_state({**state, "double_blocks.0.img_attn.qkv.weight": torch.zeros(1)}, "merged")
    with pytest.raises(P.PuLIDFileError, match="pickle is refused"):
        P.load_file(str(tmp_path / "pulid.bin"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(P.PuLIDFileError, match="cannot be read"):
        P.load_file(str(bad))


def test_eva02_clip_features_equal_the_authors_eva_vit():
    """The published EVA-CLIP names mapped onto timm's EVA (open_clip's EVA02-L-14-336 tower): the embedding
    and the five hidden states PuLID reads equal the authors' EVAVisionTransformer on the same weights."""
    from omniid.encoders import eva_clip
    from support.pulid_reference import reference_eva
    theirs, state = reference_eva()
    ours = eva_clip.load_state({**state, "text.token_embedding.weight": torch.zeros(3, 3), "logit_scale": torch.ones(())})
    assert ours.config.depth == 21 and ours.config.heads == 1 and ours.config.image_size == 56
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        embedding, hidden = theirs(x, return_all_features=False, return_hidden=True, shuffle=False)
        mine, my_hidden = ours(x)
    assert relative(mine, embedding) <= 1e-5
    assert len(my_hidden) == len(hidden) == 5
    assert max(relative(a, b) for a, b in zip(my_hidden, hidden)) <= 1e-5
    with pytest.raises(eva_clip.EvaFileError, match="not an EVA02-CLIP vision checkpoint"):
        eva_clip.load_state({"vision_model.embeddings.patch_embedding.weight": torch.zeros(4, 3, 14, 14)})


def test_open_clip_builds_eva02_l_14_336_from_the_timm_model_the_pack_uses():
    import json
    import os

    import open_clip
    from omniid.encoders import eva_clip
    config = json.load(open(os.path.join(os.path.dirname(open_clip.__file__), "model_configs", "EVA02-L-14-336.json")))
    assert config["vision_cfg"]["timm_model_name"] == eva_clip.TIMM_NAME and config["embed_dim"] == 768


class _Face:
    def __init__(self, x, kind="arcface512"):
        import numpy as np
        self.bbox = np.array([x, 20.0, x + 40.0, 70.0])
        self.keypoints5 = np.array([[x + 12, 35], [x + 28, 35], [x + 20, 45], [x + 14, 55], [x + 26, 55]], float)
        self.landmark_format, self.landmarks = "kps5", self.keypoints5
        self.embedding, self.embedding_kind = np.full(512, x, np.float32), kind

    @property
    def area(self):
        return float((self.bbox[2] - self.bbox[0]) * (self.bbox[3] - self.bbox[1]))


class _Analyser:
    """Faces by photo index (the photo's first pixel tells which)."""

    def __init__(self, faces):
        self.faces = faces

    def detect(self, pixels, with_embedding=True):
        return self.faces[int(pixels[0, 0, 0])]


def test_photos_without_a_face_are_skipped_and_reported_and_none_at_all_is_an_error():
    from omniid.encoders.face.types import NoFaceFoundError
    from omniid.encoders.pulid_faces import pulid_faces
    photos = torch.rand(3, 96, 128, 3)
    photos[:, 0, 0, 0] = torch.tensor([0.0, 1.0, 2.0]) / 255.0
    analyser = _Analyser({0: [_Face(10.0), _Face(60.0)], 1: [], 2: [_Face(30.0)]})
    faces = pulid_faces(photos, analyser)
    assert faces.kept == [0, 2] and faces.skipped == [1]
    assert faces.arcface.shape == (2, 512) and faces.images.shape == (2, 3, 512, 512)
    assert "2 of 3 photo(s) used" in faces.report(3) and "no face in photo(s) 2 (skipped)" in faces.report(3)
    # white background, grey face: the three channels equal
    assert float(faces.images[:, :, 0, 0].min()) == 1.0 and torch.equal(faces.images[:, 0], faces.images[:, 2])
    with pytest.raises(NoFaceFoundError, match="no face in any of the 1 photo"):
        pulid_faces(photos[1:2], analyser)
    with pytest.raises(ValueError, match="needs ArcFace embeddings"):
        pulid_faces(photos[2:], _Analyser({2: [_Face(30.0, kind="dlib128")]}))


def test_the_face_parsing_model_loads_from_its_published_layout_and_whitens_its_background(tmp_path):
    """facexlib's parsing_bisenet.pth layout (a plain state dict, read with weights_only=True); with a parser
    the background is the authors' label set (background, neck, clothes, ears, earrings, necklace, hat)."""
    from omniid.encoders import face_parsing
    from omniid.encoders.pulid_faces import PARSING_BACKGROUND, pulid_faces
    torch.manual_seed(0)
    path = tmp_path / "parsing_bisenet.pth"
    torch.save(face_parsing.BiSeNetParser().state_dict(), str(path))
    parser = face_parsing.load_file(str(path))
    assert parser.labels(torch.rand(1, 3, 64, 64)).shape == (1, 1, 64, 64)
    with pytest.raises(face_parsing.FaceParsingFileError, match="not facexlib's BiSeNet"):
        face_parsing.load_state({"conv_out.conv_out.weight": torch.zeros(19, 256, 1, 1)})

    def halves(images):                   # left half hair (17, kept), right half neck (14, background)
        labels = torch.full((images.shape[0], 1, *images.shape[2:]), 17)
        labels[..., images.shape[-1] // 2:] = 14
        return labels
    photos = torch.rand(1, 96, 128, 3)
    photos[0, 0, 0, 0] = 0.0
    faces = pulid_faces(photos, _Analyser({0: [_Face(30.0)]}), parsing=halves)
    assert faces.background == "face parsing model" and 14 in PARSING_BACKGROUND and 17 not in PARSING_BACKGROUND
    assert float(faces.images[0, :, :, 256:].min()) == 1.0            # whitened
    assert float(faces.images[0, :, 200:300, 100:200].max()) < 1.0    # the grey face (the crop of a random photo)


def test_the_face_parsing_network_equals_facexlibs_bisenet_and_whitens_as_the_authors(tmp_path):
    """facexlib 0.3.0's BiSeNet (its wheel's parsing/bisenet.py and resnet.py, fetched by the test support)
    with every weight random, batch-norm statistics included, saved as parsing_bisenet.pth is keyed (the
    model's state dict): the pack's loader reads that file and its logits equal facexlib's to float32
    round-off; its labels and grey face on white equal what the authors' own get_id_embedding lines (their
    to_gray and background labels) make of facexlib's output."""
    import torch.nn.functional as F
    from omniid.encoders import face_parsing
    from omniid.encoders.pulid_faces import features_image, parsing_background
    from support.facexlib_reference import authors_whitening, reference_bisenet
    reference, state = reference_bisenet(seed=4)
    path = tmp_path / "parsing_bisenet.pth"
    torch.save(state, str(path))
    ours = face_parsing.load_file(str(path))
    assert set(ours.state_dict()) == set(state) and not ours.training
    # two aligned "faces": smooth random images, 144 px (no multiple of 32: 9 and 5 px features at 1/16, 1/32)
    faces = F.interpolate(torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)), (144, 144),
                          mode="bilinear")
    outputs = []

    def facexlib_parse(x):
        outputs.append(reference(x))
        return outputs[-1]
    labels_ref, image_ref = authors_whitening(facexlib_parse)(faces)
    expected = outputs[0][0]                                   # the main head's logits, at the input size
    logits = []                                                # the pack's, inside its own labels()
    ours.register_forward_hook(lambda module, inputs, output: logits.append(output))
    labels = ours.labels(faces)
    assert len(logits) == 1 and logits[0].shape == expected.shape == (2, 19, 144, 144)
    assert relative(logits[0], expected) <= 1e-5
    # labels may differ only where facexlib's two best logits are within round-off of each other
    top2 = expected.topk(2, dim=1).values
    tie = (top2[:, :1] - top2[:, 1:2]) <= 1e-5 * float(expected.abs().max())
    assert int(tie.sum()) <= 10 and torch.equal(labels[~tie], labels_ref[~tie])
    background = parsing_background(labels)
    assert 0.2 < float(background.float().mean()) < 0.8 and len(labels.unique()) >= 8    # a real test of the rule
    assert torch.equal(features_image(faces, background).masked_select(~tie),
                       image_ref.masked_select(~tie))
