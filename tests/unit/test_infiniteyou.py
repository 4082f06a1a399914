"""InfiniteYou without ComfyUI: the published image projection layout, the identity tokens equal to the authors'
Resampler (their code, from the vendored archive) on identical random weights, several photos, photos without
a face skipped, the authors' step window, the five-keypoint control image against their OpenCV drawing, and the
pack's IR-SE50 ArcFace against facexlib's (its wheel's code) and the authors' extract_arcface_bgr_embedding."""
import numpy as np
import pytest
import torch

from omniid.encoders import infiniteyou as IY
from omniid.encoders.face.types import DetectedFace, NoFaceFoundError
from omniid.guidance.infiniteyou import keep, sample_index, step_of
from support.infiniteyou_reference import (TINY, arcface, draw_kps, reference_module, reference_resampler, relative,
                                           resize_and_pad_image)


@pytest.fixture(scope="module")
def pair():
    theirs, state = reference_resampler(seed=0)
    return theirs, state, IY.load_state(state, "tiny")


def test_the_published_layout_loads_with_its_sizes(pair, tmp_path):
    theirs, state, ours = pair
    assert set(ours.state_dict()) == set(state["image_proj"])
    c = ours.config
    assert (c.dim, c.depth, c.heads, c.dim_head, c.num_queries, c.embedding_dim, c.output_dim, c.ff_mult) == (
        TINY["dim"], TINY["depth"], 2, 64, 8, 512, TINY["output_dim"], 4)
    path = tmp_path / "image_proj_model.bin"           # the authors' file: torch.save of {"image_proj": ...}
    torch.save(state, path)
    assert relative(IY.load_file(str(path)).latents, theirs.latents) == 0.0
    # the published sizes are the authors' (InfUFluxPipeline builds the Resampler with these)
    with torch.device("meta"):
        published = reference_module("pipelines.resampler").Resampler(
            dim=1280, depth=4, dim_head=64, heads=20, num_queries=8, embedding_dim=512, output_dim=4096, ff_mult=4)
        ours_full = IY.Resampler(IY.ResamplerConfig())
    assert {k: v.shape for k, v in published.state_dict().items()} == {k: v.shape for k, v in ours_full.state_dict().items()}


def test_identity_tokens_equal_the_authors_resampler(pair):
    theirs, _, ours = pair
    embeds = arcface(1)
    with torch.no_grad():
        expected = theirs(embeds[:, None])              # the pipeline's id_embed.reshape([1, -1, 512])
    got = IY.identity_tokens(ours, embeds)
    assert got.shape == (1, 8, TINY["output_dim"])
    assert relative(got, expected) <= 1e-5


def test_several_photos_average_the_embeddings_or_the_tokens(pair):
    theirs, _, ours = pair
    embeds = arcface(3, seed=2)
    with torch.no_grad():
        mean_embedding = theirs(embeds.mean(0, keepdim=True)[:, None])
        mean_tokens = theirs(embeds[:, None]).mean(0, keepdim=True)
    assert relative(IY.identity_tokens(ours, embeds, "embeddings"), mean_embedding) <= 1e-5
    assert relative(IY.identity_tokens(ours, embeds, "tokens"), mean_tokens) <= 1e-5
    assert relative(mean_tokens, mean_embedding) > 1e-3
    with pytest.raises(ValueError, match="combine"):
        IY.identity_tokens(ours, embeds, "concat")


def test_files_of_another_kind_are_refused_clearly(tmp_path):
    with pytest.raises(IY.InfiniteYouFileError, match="image_proj_model.bin"):
        IY.load_state({"ip_adapter.1.to_k_ip.weight": torch.zeros(2, 2)}, "other.bin")
    _, state = reference_resampler(seed=1)
    del state["image_proj"]["norm_out.weight"]
    with pytest.raises(IY.InfiniteYouFileError, match="missing"):
        IY.load_state(state, "cut.bin")
    path = tmp_path / "pickled.bin"
    torch.save({"image_proj": {"latents": torch.zeros(1)}, "code": np.dtype("float32")}, path)
    with pytest.raises(IY.InfiniteYouFileError, match="pickled objects are refused"):
        IY.load_file(str(path))


class Analyzer:
    """Faces by photo index: photo 1 has none."""

    def __init__(self, embeddings):
        self.embeddings, self.calls = embeddings, 0

    def detect(self, image, with_embedding=False):
        index, self.calls = self.calls, self.calls + 1
        if index == 1:
            return []
        kps = np.array([[20, 20], [40, 20], [30, 30], [22, 40], [38, 40]], dtype=np.float64)
        small = DetectedFace(np.array([0, 0, 5, 5.0]), 0.9, kps, kps, "kps5", np.ones(512, np.float32), "arcface512")
        big = DetectedFace(np.array([0, 0, 50, 50.0]), 0.9, kps, kps, "kps5", self.embeddings[index], "arcface512")
        return [small, big]


def test_a_photo_without_a_face_is_skipped_and_the_largest_face_used():
    raw = torch.randn(3, 512, generator=torch.Generator().manual_seed(3)).numpy() * 7
    embeds, kept, skipped = IY.arcface_embeddings(torch.rand(3, 64, 64, 3), Analyzer(raw))
    assert kept == [0, 2] and skipped == [1]
    expected = torch.from_numpy(raw[[0, 2]])
    assert relative(embeds, expected / expected.norm(dim=-1, keepdim=True)) <= 1e-6
    with pytest.raises(NoFaceFoundError, match="no face in any of the 1 photo"):
        IY.arcface_embeddings(torch.rand(1, 64, 64, 3), type("None", (), {"detect": lambda *a, **k: []})())


def test_the_step_window_is_the_pipelines_controlnet_keep():
    # the pipeline: keep = 1 - (i / n < start or (i + 1) / n > end)
    for n in (1, 4, 28):
        for start, end in ((0.0, 1.0), (0.1, 1.0), (0.0, 0.5), (0.25, 0.75)):
            assert [keep(i, n, start, end) for i in range(n)] == [not (i / n < start or (i + 1) / n > end)
                                                                  for i in range(n)]
    sigmas = torch.tensor([1.0, 0.8, 0.5, 0.2, 0.0])
    assert [step_of(sigmas, s) for s in (1.0, 0.8, 0.65, 0.2)] == [(0, 4), (1, 4), (1, 4), (3, 4)]
    assert step_of(None, 0.5) is None and step_of(sigmas, 1.5) is None
    # FLUX.1 (19 double, 38 single blocks) with InfuseNet's blocks: diffusers' ceil interval
    assert [sample_index(i, 19, 5) for i in (0, 3, 4, 18)] == [0, 0, 1, 4]


def test_the_control_image_matches_the_authors_drawing():
    pytest.importorskip("cv2")
    from PIL import Image
    theirs = draw_kps()
    kps = np.array([[100.3, 120.8], [160.2, 118.1], [131.0, 160.4], [108.7, 196.2], [152.9, 194.0]])
    expected = np.asarray(theirs(Image.new("RGB", (256, 288)), kps))
    got = IY.draw_keypoints(kps, 256, 288)
    assert got.shape == expected.shape and got.dtype == np.uint8
    lit = (expected > 0).any(-1) | (got > 0).any(-1)
    differ = (np.abs(got.astype(int) - expected.astype(int)).max(-1) > 0)
    # the same shapes and colours; only edge pixels of the rasterised ellipses and discs differ
    assert differ.sum() / lit.sum() <= 0.03, differ.sum() / lit.sum()        # 1.2% here
    for colour, (x, y) in zip(IY.KEYPOINT_COLORS, kps.astype(int)):
        assert tuple(got[y, x]) == tuple(expected[y, x]) == colour


@pytest.fixture(scope="module")
def recognizer():
    from omniid.encoders import arcface_ir_se as A
    torch.manual_seed(0)
    model = A.IRSE50().eval()
    for module in model.modules():            # BatchNorm statistics random too
        if isinstance(module, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model


def test_facexlibs_ir_se50_layout_loads_with_or_without_its_old_keys(recognizer, tmp_path):
    # written from facexlib's published architecture; facexlib's code is not among the reference archives
    from omniid.encoders import arcface_ir_se as A
    state = recognizer.state_dict()
    # facexlib's Backbone(50, mode='ir_se') names (TreB1eN's InsightFace port)
    for key, shape in (("input_layer.0.weight", (64, 3, 3, 3)), ("body.0.res_layer.5.fc1.weight", (4, 64, 1, 1)),
                       ("body.3.shortcut_layer.0.weight", (128, 64, 1, 1)), ("body.23.res_layer.2.weight", (512,)),
                       ("output_layer.3.weight", (512, 512 * 7 * 7)), ("output_layer.4.running_var", (512,))):
        assert tuple(state[key].shape) == shape, key
    assert len({k.split(".")[1] for k in state if k.startswith("body.")}) == 24
    # as saved from DataParallel before PyTorch 0.4.1: "module." names, no BatchNorm step counters
    old = {f"module.{k}": v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    loaded = A.load_state(old)
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items() if not k.endswith("tracked"))
    with pytest.raises(A.ArcFaceFileError, match="not facexlib's IR-SE50"):
        A.load_state({"input_layer.0.weight": torch.zeros(64, 3, 3, 3)}, "parsing_bisenet.pth")
    path = tmp_path / "pickled.pth"
    torch.save({"input_layer.0.weight": torch.zeros(1), "code": np.dtype("float32")}, path)
    with pytest.raises(A.ArcFaceFileError, match="pickled objects are refused"):
        A.load_file(str(path))


def test_with_facexlibs_arcface_the_aligned_bgr_face_is_embedded():
    from omniid.encoders.arcface_ir_se import IRSE50, aligned_faces
    torch.manual_seed(1)
    recognizer = IRSE50(stages=((16, 16, 1), (16, 32, 2), (32, 32, 1), (32, 64, 1)), embedding=16).eval()  # narrow
    photos = torch.rand(3, 64, 64, 3, generator=torch.Generator().manual_seed(5))
    embeds, kept, skipped = IY.arcface_embeddings(photos, Analyzer(np.zeros((3, 512), np.float32)), recognizer)
    assert embeds.shape == (2, 16) and torch.allclose(embeds.norm(dim=1), torch.ones(2), atol=1e-5)
    assert kept == [0, 2] and skipped == [1]
    kps = Analyzer(np.zeros((1, 512), np.float32)).detect(None)[1].keypoints5
    crops = torch.cat([aligned_faces(photos[i], [kps]) for i in (0, 2)])
    assert crops.shape == (2, 3, 112, 112) and crops.min() >= -1 and crops.max() <= 1
    with torch.no_grad():
        expected = recognizer(crops)
    assert relative(embeds, expected) <= 1e-6
    # BGR, as OpenCV hands the authors' recogniser its crop: the first channel is the photo's blue
    from omniid.encoders.face.alignment import ARCFACE_TEMPLATE_112, estimate_similarity, warp_crop
    rgb = warp_crop(photos[0], estimate_similarity(np.asarray(kps, np.float64), ARCFACE_TEMPLATE_112), 112)
    assert relative(crops[0, 0], rgb[..., 2] * 2 - 1) <= 1e-6 and relative(crops[0, 2], rgb[..., 0] * 2 - 1) <= 1e-6


@pytest.fixture(scope="module")
def facexlib_arcface(tmp_path_factory):
    """(facexlib's IR-SE50 loaded by facexlib's own init_recognition_model, the pack's from the same file, the
    file's state dict): facexlib 0.3.0's Backbone(50, mode='ir_se') with every parameter random (batch-norm
    statistics and PReLU slopes included), saved as recognition_arcface_ir_se50.pth is keyed."""
    from omniid.encoders import arcface_ir_se as A
    from support.facexlib_reference import init_recognition_model, reference_arcface
    _, state = reference_arcface(seed=7)
    path = tmp_path_factory.mktemp("facexlib") / "recognition_arcface_ir_se50.pth"
    torch.save(state, str(path))
    theirs = init_recognition_model(path)          # load_state_dict(torch.load(path), strict=True)
    return theirs, A.load_file(str(path)), state


def test_the_arcface_network_equals_facexlibs_ir_se50_loaded_from_the_same_file(facexlib_arcface):
    """The pack's IR-SE50 reads the file facexlib's init_recognition_model reads (the same keys, unchanged) and
    embeds the authors' input (BGR crops, 112 px, in [-1, 1]) as facexlib's Backbone does, to float32
    round-off: before the L2 normalisation and after it."""
    import torch.nn.functional as F
    theirs, ours, state = facexlib_arcface
    assert not theirs.training and not ours.training
    loaded = ours.state_dict()
    assert set(loaded) == set(state) and set(state) == set(theirs.state_dict())
    assert len({k.split(".")[1] for k in state if k.startswith("body.")}) == 24
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    faces = F.interpolate(torch.rand(2, 3, 14, 14, generator=torch.Generator().manual_seed(8)), (112, 112),
                          mode="bilinear", align_corners=False) * 2 - 1
    features = []                              # the output layer's (BatchNorm1d) output, before the L2 norm
    hooks = [m.output_layer.register_forward_hook(lambda module, i, o: features.append(o)) for m in (theirs, ours)]
    try:
        with torch.no_grad():
            expected, got = theirs(faces), ours(faces)
    finally:
        for hook in hooks:
            hook.remove()
    assert got.shape == expected.shape == (2, 512)
    assert relative(features[1], features[0]) <= 1e-5
    assert relative(got, expected) <= 1e-5, relative(got, expected)          # 0 here: the same operations
    assert torch.allclose(expected.norm(dim=1), torch.ones(2), atol=1e-6)
    assert float(expected[0] @ expected[1]) < 0.95                           # the picture matters


@pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")     # scikit-image 0.26, in norm_crop
def test_the_arcface_crop_and_embedding_equal_the_authors_extract_arcface_bgr_embedding(facexlib_arcface):
    """The authors' extract_arcface_bgr_embedding (insightface's norm_crop of the BGR photo, / 255, 2x - 1,
    facexlib's recogniser, its first row) and the pack's arcface_embeddings with its IR-SE50: for a face on
    ArcFace's template (the alignment is the identity for both), the same network input and the same embedding
    to float32 round-off. Where the photo must be warped, the crops differ by the warp alone (OpenCV's
    bilinear on 1/32 px, uint8; the pack's bilinear, supersampled when it shrinks the photo)."""
    import torch.nn.functional as F
    from omniid.encoders.arcface_ir_se import aligned_faces
    from omniid.encoders.face.alignment import ARCFACE_TEMPLATE_112
    from support.infiniteyou_reference import authors_arcface_embedding, insightface_face_align
    if insightface_face_align() is None:
        pytest.skip("insightface (with OpenCV and scikit-image) is not installed: requirements-insightface.txt")
    theirs, ours, _ = facexlib_arcface
    extract = authors_arcface_embedding()
    g = torch.Generator().manual_seed(9)

    def photo(size, detail):                   # an RGB uint8 photo, smooth at 1/detail of its size
        small = torch.rand(1, 3, detail, detail, generator=g)
        return (F.interpolate(small, (size, size), mode="bicubic", align_corners=False).clamp(0, 1)[0]
                .permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()

    class OneFace:
        def __init__(self, kps):
            self.kps = kps

        def detect(self, image, with_embedding=False):
            return [DetectedFace(np.array([0, 0, 60, 60.0]), 0.9, self.kps, self.kps, "kps5")]

    inputs = []

    def recorded(model):
        return lambda x: inputs.append(x) or model(x)
    # the face on ArcFace's template
    kps = ARCFACE_TEMPLATE_112.copy()
    rgb = photo(112, 14)
    with torch.no_grad():
        expected = extract(np.ascontiguousarray(rgb[..., ::-1]), kps, recorded(theirs))    # cv2's BGR photo
    pixels = torch.from_numpy(rgb).float() / 255
    assert relative(aligned_faces(pixels, [kps])[0], inputs[0][0]) <= 1e-5      # float32 sampling coordinates
    embeds, kept, _ = IY.arcface_embeddings(pixels[None], OneFace(kps), ours)
    assert kept == [0] and embeds.shape == (1, 512)
    assert relative(embeds[0], expected) <= 1e-5, relative(embeds[0], expected)      # 9.4e-7 here
    # warped faces, turned 10 degrees: 1.6x the template (the crop shrinks the photo: the pack box-filters 2x2
    # samples, OpenCV samples once; mean 0.56 levels here, more where the crop leaves the photo), then 0.8x (one
    # bilinear sample on both sides: OpenCV's 1/32 px coordinates and uint8 rounding, at most 0.5 levels here)
    for scale, mean_bound, max_bound in ((1.6, 1.0, 255.0), (0.8, 0.5, 1.0)):
        angle = np.deg2rad(10.0)
        rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        kps = ((ARCFACE_TEMPLATE_112 - 56.0) @ rotation.T + 100.0).astype(np.float32)
        rgb = photo(200, 24)
        inputs.clear()
        extract(np.ascontiguousarray(rgb[..., ::-1]), kps, recorded(lambda x: x.flatten(1)))
        crop = aligned_faces(torch.from_numpy(rgb).float() / 255, [kps])[0]
        levels = (crop - inputs[0][0]).abs() * 127.5                            # in 8-bit levels
        assert float(levels.mean()) <= mean_bound and float(levels.max()) <= max_bound, (
            scale, float(levels.mean()), float(levels.max()))


def test_the_control_photo_is_fitted_to_the_canvas_as_the_authors_do():
    from PIL import Image
    theirs = resize_and_pad_image()
    g = torch.Generator().manual_seed(6)
    for (h, w), (width, height) in (((90, 60), (64, 96)), ((60, 90), (96, 64)), ((80, 80), (64, 64)),
                                    ((40, 100), (64, 96))):
        photo = (torch.rand(h, w, 3, generator=g) * 255).round() / 255
        expected = np.asarray(theirs(Image.fromarray((photo.numpy() * 255).round().astype(np.uint8)), (width, height)))
        assert np.array_equal(IY.fit_to_canvas(photo, width, height), expected), ((h, w), (width, height))
