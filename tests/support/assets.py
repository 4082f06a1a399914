"""Test and benchmark assets, obtained from PyPI packages into a cache (never from model hubs).

- Face photos: the ``face_recognition==1.3.0`` source distribution ships
  ``tests/test_images`` (Obama x6 including an RGBA copy, Biden x1; MIT licence).
- A photo without a human face: scikit-image's ``chelsea`` (a cat; public domain).
- A group photo: insightface's package data ``t1.jpg`` (when insightface is installed).
- Tiny ComfyUI checkpoints: written by ``tests/comfy/tiny_models.py`` with the
  Python that runs ComfyUI.

The cache is ``$OMNI_IDENTITY_CACHE`` or ``~/.cache/comfyui-omniidentity``.
"""
from __future__ import annotations

import atexit
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Optional

FACE_RECOGNITION_SDIST = "face_recognition==1.3.0"
FACE_PHOTOS = ("obama.jpg", "obama2.jpg", "obama3.jpg", "obama_partial_face.jpg",
               "obama_partial_face2.jpg", "32bit.png", "biden.jpg")
TINY_MODELS_SCRIPT = Path(__file__).resolve().parent.parent / "comfy" / "tiny_models.py"


def scratch_dir(prefix: str) -> Path:
    """A new temporary folder that is removed when this process exits (reference checks write
    hundreds of MB of models and unpacked archives; left behind, they fill the disk)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


class AssetError(RuntimeError):
    pass


def cache_dir() -> Path:
    root = Path(os.environ.get("OMNI_IDENTITY_CACHE") or Path.home() / ".cache" / "comfyui-omniidentity")
    root.mkdir(parents=True, exist_ok=True)
    return root


def unpacked_vendor_archive(archive: Path, name: str, marker: str) -> Path:
    """A vendored reference archive unpacked once into the cache (``vendor/<name>``); ``marker`` (a path inside
    the unpacked folder) says it is complete."""
    target = cache_dir() / "vendor" / name
    if not (target / marker).exists():
        if not archive.exists():
            raise FileNotFoundError(f"the vendored reference archive is missing: {archive}")
        staging = target.with_name(target.name + ".part")
        staging.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as opened:
            opened.extractall(staging, filter="data")
        staging.rename(target) if not target.exists() else None
    return target


def face_photos() -> Path:
    """A folder with the face_recognition test photos (downloaded once with pip)."""
    target = cache_dir() / "photos" / "face_recognition-1.3.0"
    if all((target / name).is_file() for name in FACE_PHOTOS):
        return target
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
               "face-recognition", FACE_RECOGNITION_SDIST, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(tmp).glob("face_recognition-1.3.0.tar.gz"))
        if done.returncode != 0 or not archives:
            raise AssetError(f"could not fetch the test photos ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
        staging = Path(tmp) / "photos"
        staging.mkdir()
        with tarfile.open(archives[0]) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if "/tests/test_images/" in member.name and name in FACE_PHOTOS and member.isfile():
                    (staging / name).write_bytes(tar.extractfile(member).read())
        missing = [n for n in FACE_PHOTOS if not (staging / n).is_file()]
        if missing:
            raise AssetError(f"{FACE_RECOGNITION_SDIST} lacks {missing}")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        shutil.move(str(staging), str(target))
    return target


def no_face_photo() -> Path:
    """A real photo with no human face in it (scikit-image's cat)."""
    target = cache_dir() / "photos" / "chelsea_cat.png"
    if not target.is_file():
        try:
            from skimage import data
        except ImportError as exc:
            raise AssetError("scikit-image is needed for the no-face photo (requirements-test.txt)") from exc
        from PIL import Image
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(data.chelsea()).save(target)
    return target


IDENTITY_SET = (("obama.jpg", False), ("obama2.jpg", False), ("obama3.jpg", False),
                ("obama_partial_face2.jpg", False), ("obama.jpg", True), ("obama2.jpg", True), ("obama3.jpg", True))


def identity_photo_set(size: int = 512) -> dict[str, Path]:
    """Seven photos of one person, letterboxed to size x size so ComfyUI can batch them
    (the five distinct Obama photos' faces, plus mirror images), and a faceless one.

    Names: ``id_1.png`` ... ``id_7.png`` and ``no_face.png``.
    """
    from PIL import Image, ImageOps
    target = cache_dir() / "photos" / f"identity_{size}"
    names = [f"id_{i + 1}.png" for i in range(len(IDENTITY_SET))] + ["no_face.png"]
    if not all((target / n).is_file() for n in names):
        target.mkdir(parents=True, exist_ok=True)
        sources = [(face_photos() / name, mirror) for name, mirror in IDENTITY_SET] + [(no_face_photo(), False)]
        for name, (source, mirror) in zip(names, sources):
            image = Image.fromarray(load_photo(source))
            if mirror:
                image = ImageOps.mirror(image)
            image.thumbnail((size, size), Image.LANCZOS)
            canvas = Image.new("RGB", (size, size), (127, 127, 127))
            canvas.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
            canvas.save(target / name)
    return {name: target / name for name in names}


def two_people_photo(size: int = 512) -> Path:
    """Two people side by side (Obama and Biden, each letterboxed to size x size): a 2 size x size layout."""
    from PIL import Image
    target = cache_dir() / "photos" / f"two_people_{size}.png"
    if not target.is_file():
        canvas = Image.new("RGB", (2 * size, size), (127, 127, 127))
        for slot, name in enumerate(("obama.jpg", "biden.jpg")):
            pixels = load_photo(face_photos() / name)
            side = min(pixels.shape[:2])
            image = Image.fromarray(pixels[:side, (pixels.shape[1] - side) // 2:][:, :side])    # the top square
            image.thumbnail((size, size), Image.LANCZOS)
            canvas.paste(image, (slot * size + (size - image.width) // 2, (size - image.height) // 2))
        target.parent.mkdir(parents=True, exist_ok=True)
        canvas.save(target)
    return target


def group_photo() -> Optional[Path]:
    """insightface's t1.jpg (several people), or None when insightface is absent."""
    spec = importlib.util.find_spec("insightface")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "images" / "t1.jpg"
    return path if path.is_file() else None


def load_photo(path: Path):
    """A photo as an RGB uint8 array, upright (EXIF orientation applied, as LoadImage does)."""
    import numpy as np
    from PIL import Image, ImageOps
    return np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))


def random_arcface_onnx(path: Path, seed: int = 0) -> Path:
    """An ONNX model with ArcFace's interface (1 x 3 x 112 x 112 in, 512 out), random weights.

    insightface's model zoo recognises it as a recognition model, so the real
    insightface/onnxruntime path runs on it; its embeddings mean nothing.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    conv = rng.normal(0.0, 0.05, (16, 3, 8, 8)).astype(np.float32)
    dense = rng.normal(0.0, 0.02, (512, 16 * 14 * 14)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input.1", "conv_w"], ["c"], strides=[8, 8], name="Conv_0"),
         helper.make_node("Relu", ["c"], ["r"], name="Relu_1"),
         helper.make_node("Flatten", ["r"], ["f"], axis=1, name="Flatten_2"),
         helper.make_node("Gemm", ["f", "dense_w", "dense_b"], ["embedding"], transB=1, name="Gemm_3")],
        "random_arcface",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 512])],
        initializer=[numpy_helper.from_array(conv, "conv_w"), numpy_helper.from_array(dense, "dense_w"),
                     numpy_helper.from_array(np.zeros(512, np.float32), "dense_b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


# Small random encoder files of each architecture (real CLIP-H input width, shallow)
TEST_ENCODERS = {
    "omniid_tiny_omni_id.safetensors": dict(architecture="omni_id", cross_depth=1, self_depth=1, mlp_ratio=1.0),
    "omniid_tiny_arcface.safetensors": dict(architecture="arcface", num_queries=16, id_hidden=64),
    "omniid_tiny_infinite_id.safetensors": dict(architecture="infinite_id", id_hidden=64, face_tokens=4),
    "omniid_tiny_arcface_clip.safetensors": dict(architecture="arcface_clip", num_queries=16, id_hidden=64,
                                                 cross_depth=1, self_depth=1, mlp_ratio=1.0),
}
SYNTHETIC_FLAME_VERSION = 2     # omniid/flame_fixture.py's files; bump when they change
FLUX_IP_FIXTURES = 1            # the XLabs-layout adapter of the tiny FLUX and the random CLIP-L; bump when they change
TINY_FLUX_XLABS = "omniid_tiny_flux_xlabs.safetensors"     # XLabs v1 layout for the tiny FLUX (one double block)
RANDOM_CLIP_L = "omniid_random_clip_vit_l.safetensors"
TEST_ARCFACE_ONNX = "models/omniid_test/random_arcface.onnx"   # under models/insightface/
TINY_UNET_ATTN2_DIMS = (320, 320, 320, 320)   # tests/comfy/tiny_models.py's UNet: input 1, output 0-1, middle
TINY_SDXL_ATTN2_DIMS = (320,) * 22             # its SDXL-family UNet: input 2 + 5, output 5 + 5 + 2 + 2, middle 1
TEST_ADAPTERS = {
    "omniid_tiny_sd15_omni.safetensors": dict(projection="none", token_dim=1280),
    "omniid_tiny_sdxl_omni.safetensors": dict(projection="none", token_dim=1280, layer_dims=TINY_SDXL_ATTN2_DIMS),
    "omniid_tiny_flux_omni.safetensors": dict(family="flux", projection="none", token_dim=1280,
                                              layer_dims=(3072, 3072)),   # one double + one single block
    "omniid_tiny_sd15_plus_h94.safetensors": dict(
        projection="plus", token_dim=768, projection_args=dict(dim=64, depth=1, heads=1, embedding_dim=1280,
                                                               output_dim=768, ff_mult=2, num_queries=4)),
    "omniid_tiny_sd15_faceid_plusv2_h94.safetensors": dict(
        projection="faceid_plusv2", token_dim=768, projection_args=dict(
            id_dim=512, hidden=64, output_dim=768, num_tokens=4, dim=768, depth=1, heads=12, embedding_dim=1280,
            ff_mult=1)),
    # the baselines' own adapters (they read the baseline encoders' projected tokens)
    "omniid_tiny_sd15_arcface.safetensors": dict(projection="none", token_dim=1280, embeds_kind="arcface"),
    "omniid_tiny_sd15_arcface_clip.safetensors": dict(projection="none", token_dim=1280, embeds_kind="arcface_clip"),
    "omniid_tiny_sd15_infinite_id.safetensors": dict(projection="none", token_dim=1280, embeds_kind="infinite_id"),
    # made for another UNet: the fit check must name adapter, embeds and model
    "omniid_tiny_other_unet.safetensors": dict(projection="none", token_dim=1280, layer_dims=(640, 640, 1280)),
    # h94's published files, by their published names, in their layouts for the tiny SD1.5 and SDXL-family UNets
    "ip-adapter-plus-face_sd15.safetensors": dict(
        projection="plus", token_dim=768, projection_args=dict(dim=64, depth=1, heads=1, embedding_dim=1280,
                                                               output_dim=768, ff_mult=2, num_queries=4)),
    "ip-adapter-plus-face_sdxl_vit-h.safetensors": dict(
        projection="plus", token_dim=2048, layer_dims=TINY_SDXL_ATTN2_DIMS, projection_args=dict(
            dim=64, depth=1, heads=1, embedding_dim=1280, output_dim=2048, ff_mult=2, num_queries=4)),
    "ip-adapter-faceid-plusv2_sdxl.bin": dict(
        projection="faceid_plusv2", token_dim=2048, layer_dims=TINY_SDXL_ATTN2_DIMS, projection_args=dict(
            id_dim=512, hidden=64, output_dim=2048, num_tokens=4, dim=2048, depth=1, heads=32, embedding_dim=1280,
            ff_mult=1)),
}


def pack_test_models() -> Path:
    """Random encoder and adapter files (the pack's own code), an ArcFace-interface ONNX, an XLabs-layout
    adapter for the tiny FLUX and a random CLIP-L vision tower (written key by key in the authors'
    layouts by support.ip_layouts).

    Layout mirrors ComfyUI's models folder: omni_identity/, ipadapter/, clip_vision/, flame/ and
    insightface/models/omniid_test/random_arcface.onnx.
    """
    import hashlib

    key = hashlib.sha1(json.dumps([TEST_ENCODERS, TEST_ADAPTERS, TINY_UNET_ATTN2_DIMS, SYNTHETIC_FLAME_VERSION,
                                   FLUX_IP_FIXTURES], sort_keys=True).encode()).hexdigest()[:10]
    target = cache_dir() / "pack_models" / key
    if (target / "done").is_file():
        return target
    from omniid.encoders.checkpoint import save_encoder
    from omniid.encoders.omni_id import EncoderConfig, create_encoder

    staging = Path(tempfile.mkdtemp(prefix="pack-models-", dir=cache_dir()))
    for seed, (name, config) in enumerate(TEST_ENCODERS.items()):
        save_encoder(create_encoder(EncoderConfig(**config), seed=seed), str(staging / "omni_identity" / name),
                     extra={"note": "random weights for tests"})
    random_arcface_onnx(staging / "insightface" / TEST_ARCFACE_ONNX)
    from omniid.guidance.adapter import AdapterConfig, create_adapter, h94_state_dict, save_adapter
    from safetensors.torch import save_file
    for seed, (name, spec) in enumerate(TEST_ADAPTERS.items()):
        source = "omni_identity" if spec["projection"] == "none" else "h94"
        spec = {"family": "unet", "layer_dims": TINY_UNET_ATTN2_DIMS, **spec}
        adapter = create_adapter(AdapterConfig(source=source, **spec), seed=100 + seed)
        path = staging / "ipadapter" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if source == "h94" and name.endswith(".bin"):      # h94's .bin layout: two sections of tensors
            import torch
            flat = h94_state_dict(adapter)
            torch.save({section: {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith(section + ".")}
                        for section in ("image_proj", "ip_adapter")}, str(path))
        elif source == "h94":
            save_file(h94_state_dict(adapter), str(path))
        else:
            save_adapter(adapter, str(path), extra={"note": "random weights for tests"})
    from .ip_layouts import random_clip_vision_l, xlabs_checkpoint
    save_file(xlabs_checkpoint("xlabs_v1", 3072, 1, seed=7, width=4096, pooled=768),
              str(staging / "ipadapter" / TINY_FLUX_XLABS))
    (staging / "clip_vision").mkdir(parents=True, exist_ok=True)
    save_file(random_clip_vision_l(), str(staging / "clip_vision" / RANDOM_CLIP_L))
    from .flame_fixture import write_synthetic_flame
    write_synthetic_flame(staging / "flame")
    (staging / "done").write_text("ok")
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, target)
    return target


def tiny_models(comfyui: Path, python: str) -> Path:
    """The tiny checkpoints, built once per layout version with the first ComfyUI that asks and shared by
    every host: they are files in the published layouts, which each ComfyUI detects for itself."""
    script_version = _script_version()
    target = cache_dir() / "tiny_models" / f"v{script_version}"
    stamp = target / "done.json"
    if stamp.is_file():
        return target
    staging = Path(tempfile.mkdtemp(prefix="tiny-", dir=cache_dir()))
    done = subprocess.run([python, str(TINY_MODELS_SCRIPT), "--comfyui", str(comfyui), "--out", str(staging)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise AssetError(f"building the tiny checkpoints failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    (staging / "done.json").write_text(done.stdout.strip().splitlines()[-1])
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    return target


def _script_version() -> int:
    for line in TINY_MODELS_SCRIPT.read_text().splitlines():
        if line.startswith("VERSION"):
            return int(line.split("=")[1].split("#")[0])
    raise AssetError(f"no VERSION in {TINY_MODELS_SCRIPT}")


def tiny_model_files(folder: Path) -> dict[str, list[str]]:
    """ComfyUI model folder -> file names, for a tiny-models folder."""
    info = json.loads((folder / "done.json").read_text())
    out: dict[str, list[str]] = {}
    for rel in info["parameters"]:
        kind, name = rel.split("/", 1)
        out.setdefault(kind, []).append(name)
    return out
