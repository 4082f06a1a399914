"""IPAdapter_plus's own example workflows (examples/ of the vendored archive) run end to end in one real ComfyUI
process, each beside its twin converted by ``python -m omniid convert``, on identical random weights.

Both IPAdapter_plus and this pack are loaded as custom nodes (ComfyUI's ``nodes.load_custom_node``), and each
editor workflow is turned into an API prompt the way the editor does it (widgets by their INPUT_TYPES order,
Reroute and PrimitiveNode resolved, missing trailing widgets at their defaults) and run by ComfyUI's own
``PromptExecutor``. Every file an example asks for exists under its name, with random weights:

- checkpoints (``sd15/...``, ``sdxl/...``, ``cosxl/...``): the test checkpoints' full CLIP-L (and CLIP-G) text
  encoders and VAE around a random UNet with the real block structure ComfyUI detects as SD1.5 / SDXL / SDXL
  InstructPix2Pix (320 wide at every level: attention in input blocks 1, 2, 4, 5, 7, 8, output 3-11 and the
  middle on SD1.5; depth 2 / 10 on SDXL; 8 input channels for CosXL Edit);
- h94 IP-Adapter files of each kind the examples and the unified loaders' presets ask for (Plus, Full-Face,
  FaceID Plus v2 with its LoRA, FaceID Portrait for SDXL) and a random CLIP vision file. ComfyUI's CLIP vision
  loader only knows full-size towers by their key sets, so ``comfy.clip_vision.load`` is given the small
  config (ipadapter_plus_ref.CLIP) for this one file; its weights are read from the file;
- a face stand-in for both packs' face analysis (fixed ArcFace embedding and keypoints), as in
  ipadapter_plus_ref: IPAdapter_plus's ``insightface_loader`` and the pack's ``create_analyzer`` return it;
- the photos each LoadImage names: smooth random images of different, mostly non-square, sizes.

The one rewrite, applied to both twins alike: width and height 64 (EmptyLatentImage; ImageScale, whose image
CosXL Edit encodes as its latent), batch 1 (RepeatLatentBatch too), 3 steps, and each VAEDecode
replaced by a node that keeps its latent (the figure is the relative L2 of the sampled latents); Save/Preview
Image are dropped. Nothing IPAdapter-related is changed. A third run per example, the original with every
sampler's model taken from before IPAdapter_plus's nodes, gives how much IPAdapter_plus changes the latent.
"""
from __future__ import annotations

import hashlib
import inspect
import io
import json
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

from . import assets
from . import ip_layouts as L
from .editor_prompt import api_prompt, execute, resolved, without_ipadapter
from .ipadapter_plus_ref import ARCHIVE, CLIP, COMMIT, ID_WIDTH, h94_file, relative

VERSION = 1
SIZE, STEPS = 64, 3
# examples that convert fully and run here, with the layout of the checkpoint they ask for
RUNS = {
    "ipadapter_advanced.json": "sd15", "ipadapter_combine_embeds.json": "sd15", "ipadapter_faceid.json": "sd15",
    "ipadapter_faceid_batch.json": "sd15", "ipadapter_ideal_faceid_config.json": "sd15",
    "ipadapter_negative_image.json": "sd15", "ipadapter_noise_injection.json": "sd15", "ipadapter_simple.json": "sd15",
    "ipadapter_weight_types.json": "sd15",
    "ipadapter_portrait.json": "sdxl", "ipadapter_precise_composition.json": "sdxl",
    "ipadapter_precise_weight_type.json": "sdxl", "ipadapter_style_composition.json": "sdxl",
    "ipadapter_cosxl_edit.json": "sdxl_ip2p",
}
# the CI subset (SD1.5: the SDXL checkpoint's load and CLIP-G alone cost CI a minute; the full sweep runs them):
# the unified loader; the FaceID unified loader with its LoRA, then a Full-Face apply on its aligned face
QUICK = ("ipadapter_simple.json", "ipadapter_ideal_faceid_config.json")
# examples that convert fully but are not run here, and why
NOT_RUN = {
    "ipadapter_kolors.json": "needs the MZ Kolors nodes (ChatGLM3 text encoder, Kolors UNet loader), another "
                             "custom node pack, and Kolors weights",
}
# files placed in models/<folder> for each layout: name -> kind (ipadapter_plus_ref.h94_file)
IPADAPTER_FILES = {
    "sd15": {"ip-adapter-plus_sd15.safetensors": "plus", "ip-adapter-full-face_sd15.safetensors": "full_face",
             "ip-adapter-faceid-plusv2_sd15.bin": "faceid_plusv2"},
    "sdxl": {"ip-adapter-plus_sdxl_vit-h.safetensors": "plus", "ip-adapter-faceid-portrait_sdxl.bin": "portrait"},
    "sdxl_ip2p": {"ip-adapter_sdxl_vit-h.safetensors": "base"},
}
CLIP_VISION_NAMES = ("CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors", "IPAdapter_image_encoder_sd15.safetensors")
UNETS = {
    "sd15": dict(model_channels=320, channel_mult=[1, 1, 1, 1], num_res_blocks=[2, 2, 2, 2], num_heads=8,
                 num_head_channels=-1, transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1,
                 context_dim=768, use_linear_in_transformer=False, adm_in_channels=None),
    "sdxl": dict(model_channels=320, channel_mult=[1, 1, 1], num_res_blocks=[2, 2, 2], num_heads=-1,
                 num_head_channels=64, transformer_depth=[0, 0, 2, 2, 10, 10],
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], transformer_depth_middle=10,
                 context_dim=2048, use_linear_in_transformer=True, adm_in_channels=2816, num_classes="sequential"),
}
UNETS["sdxl_ip2p"] = dict(UNETS["sdxl"], in_channels=8)   # CosXL Edit: SDXL InstructPix2Pix (the image's latent too)
# checkpoint folder an example names -> the layout built for it
CHECKPOINT_LAYOUTS = {"sd15/": "sd15", "sdxl/": "sdxl", "cosxl/": "sdxl_ip2p"}
LAYERS = {"sd15": 16, "sdxl": 70, "sdxl_ip2p": 70}          # cross-attention layers, all 320 wide here
TINY = {"sd15": "omniid_tiny_sd15.safetensors", "sdxl": "omniid_tiny_sdxl.safetensors",
        "sdxl_ip2p": "omniid_tiny_sdxl.safetensors"}
CAPTURE = "OmniTestKeepLatent"
EXTRA_NODES = ("nodes_custom_sampler.py", "nodes_ip2p.py")     # CosXL Edit's sampler and conditioning
IPA_PACK = "ComfyUI_IPAdapter_plus"


def examples() -> dict:
    """name -> editor workflow, read from the vendored archive."""
    out = {}
    with tarfile.open(ARCHIVE) as archive:
        for member in archive.getmembers():
            if "/examples/" in member.name and member.name.endswith(".json"):
                out[Path(member.name).name] = json.load(io.TextIOWrapper(archive.extractfile(member), encoding="utf-8"))
    return out


# ---- models -----------------------------------------------------------------------------------------------

def build_models(comfyui: Path, python: str, layouts) -> Path:
    """The checkpoints, h94 files and LoRA of ``layouts`` and the CLIP vision file, each built once into the test
    cache."""
    from safetensors.torch import load_file, save_file
    folder = assets.cache_dir() / "ipadapter_plus_examples" / f"v{VERSION}"
    for sub in ("checkpoints", "ipadapter", "loras", "clip_vision"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    clip_file = folder / "clip_vision" / "omniid_small_clip_vision.safetensors"
    if not clip_file.is_file():
        save_file(small_clip_vision_state(17), str(clip_file))
    for layout in layouts:
        stamp = folder / f"done_{layout}"
        if stamp.is_file():
            continue
        index = list(UNETS).index(layout)
        unet = random_unet(layout, seed=101 + index)
        tiny = assets.tiny_models(comfyui, python) / "checkpoints" / TINY[layout]
        state = {k: v for k, v in load_file(str(tiny)).items() if not k.startswith("model.diffusion_model.")}
        state.update({"model.diffusion_model." + k: v.detach().to(torch.float16).contiguous()
                      for k, v in unet.items()})
        save_file(state, str(folder / "checkpoints" / f"omniid_ipa_examples_{layout}.safetensors"))
        del state
        for n, (name, kind) in enumerate(sorted(IPADAPTER_FILES[layout].items())):
            nested = h94_file(kind, "sd15" if layout == "sd15" else "sdxl", [320] * LAYERS[layout],
                              200 + 10 * index + n, token=UNETS[layout]["context_dim"])
            if name.endswith(".bin"):
                torch.save(nested, str(folder / "ipadapter" / name))
            else:
                save_file(L.flat(nested), str(folder / "ipadapter" / name))
            if kind in ("faceid", "faceid_plus", "faceid_plusv2"):
                save_file(faceid_lora(unet, 300 + n), str(folder / "loras" / (Path(name).stem + "_lora.safetensors")))
        del unet
        stamp.write_text(json.dumps({"version": VERSION, "ipadapter_plus": COMMIT}))
    return folder


def random_unet(layout: str, seed: int) -> dict:
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    config = dict(image_size=32, in_channels=4, out_channels=4, use_spatial_transformer=True, legacy=False,
                  use_temporal_attention=False, use_temporal_resblock=False, use_checkpoint=False)
    config.update(UNETS[layout])
    model = UNetModel(**config, operations=comfy.ops.disable_weight_init)
    return L.randomise(model, seed).state_dict()


def faceid_lora(unet: dict, seed: int) -> dict:
    """A random LoRA on some attention projections (keys as ComfyUI maps lora_unet_* names)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name in sorted(unet):
        if name.endswith(("attn1.to_q.weight", "attn2.to_out.0.weight")) and len(state) < 30:
            key = "lora_unet_" + name[:-len(".weight")].replace(".", "_")
            out_dim, in_dim = unet[name].shape
            state[f"{key}.lora_up.weight"] = (torch.randn(out_dim, 4, generator=g) * 0.3).to(torch.float16)
            state[f"{key}.lora_down.weight"] = (torch.randn(4, in_dim, generator=g) * 0.3).to(torch.float16)
            state[f"{key}.alpha"] = torch.tensor(4.0)
    return state


def small_clip_vision_state(seed: int) -> dict:
    from .ipadapter_plus_ref import clip_vision
    return {k: v.contiguous() for k, v in clip_vision(seed).model.state_dict().items()}


def serve_small_clip_vision(path: Path) -> None:
    """comfy.clip_vision.load reads ``path`` (any link to it) with the small config; other files as before."""
    import comfy.clip_vision
    import comfy.utils
    original = comfy.clip_vision.load
    target = path.resolve()
    config = assets.scratch_dir("omniid-clipv-") / "config.json"
    config.write_text(json.dumps(CLIP))

    def load(ckpt_path):
        if Path(ckpt_path).resolve() != target:
            return original(ckpt_path)
        model = comfy.clip_vision.ClipVisionModel(str(config))
        missing, _ = model.load_sd(comfy.utils.load_torch_file(str(target), safe_load=True))
        assert not missing, missing
        return model

    comfy.clip_vision.load = load


def photo(name: str):
    """A smooth random RGB image for the file ``name``; its size (four of five not square) comes from the name."""
    from PIL import Image
    seed = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)
    g = np.random.default_rng(seed)
    width, height = ((256, 192), (192, 256), (224, 224), (240, 320), (300, 200))[seed % 5]
    coarse = g.random((height // 16, width // 16, 3)) * 255
    return Image.fromarray(coarse.astype(np.uint8)).resize((width, height), Image.BICUBIC)


class StandInFaces:
    """The same face 'found' in every photo (keypoints placed by the photo's size, a fixed ArcFace embedding):
    ``get`` is insightface's FaceAnalysis API (IPAdapter_plus), ``detect`` the pack's analyser API."""

    class _Det:
        input_size = (640, 640)

    def __init__(self, seed: int, face_type):
        g = torch.Generator().manual_seed(seed)
        self.embedding = (torch.randn(ID_WIDTH, generator=g) * 20).numpy().astype(np.float32)
        self.det_model = self._Det()
        self.face_type = face_type

    @staticmethod
    def keypoints(image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        return (np.array([[-18, -12], [18, -12], [0, 4], [-14, 20], [14, 20]], dtype=np.float64)
                * min(height, width) / 100 + np.array([width / 2, height / 2])).astype(np.float32)

    def get(self, image):
        from insightface.app.common import Face
        return [Face(bbox=np.array([0, 0, 10, 10], np.float32), kps=self.keypoints(image), det_score=0.99,
                     embedding=self.embedding)]

    def detect(self, image, with_embedding: bool = True):
        kps = self.keypoints(image).astype(np.float64)
        return [self.face_type(bbox=np.array([0, 0, 10, 10.0]), score=0.99, keypoints5=kps, landmarks=kps,
                               landmark_format="kps5", embedding=self.embedding.copy(), embedding_kind="arcface512")]


# ---- ComfyUI in this process --------------------------------------------------------------------------------

class _Server:
    """What PromptExecutor asks of ComfyUI's server when nobody is listening."""
    client_id = None
    last_node_id = None
    last_prompt_id = None

    def send_sync(self, *args, **kwargs):
        pass

    def queue_updated(self):
        pass


class KeepLatent:
    """Test output node: keeps the latent it is given under ``key``."""
    KEPT: dict = {}
    RETURN_TYPES = ()
    FUNCTION = "keep"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "key": ("STRING", {"default": ""})}}

    def keep(self, samples, key):
        KeepLatent.KEPT[key] = samples["samples"].detach().clone().float()
        return {}


def load_packs(work: Path) -> dict:
    """IPAdapter_plus (from the archive) and this pack loaded as custom nodes; the face and CLIP vision stand-ins
    in place. Returns ComfyUI's node classes."""
    import nodes
    custom = work / "custom_nodes"
    custom.mkdir(parents=True)
    with tarfile.open(ARCHIVE) as archive:
        archive.extractall(custom, filter="data")
    (custom / "omniid").symlink_to(Path(__file__).resolve().parents[2])
    for name in (IPA_PACK, "omniid"):
        assert resolved(nodes.load_custom_node(str(custom / name))), f"{name} did not load"
    for extra in EXTRA_NODES:        # ComfyUI's own, as its init_builtin_extra_nodes loads them
        path = Path(nodes.__file__).resolve().parent / "comfy_extras" / extra
        assert resolved(nodes.load_custom_node(str(path), module_parent="comfy_extras")), f"{extra} did not load"
    nodes.NODE_CLASS_MAPPINGS[CAPTURE] = KeepLatent
    classes = nodes.NODE_CLASS_MAPPINGS
    ipa_module = sys.modules[classes["IPAdapterAdvanced"].__module__]
    face_module = sys.modules[classes["OmniIdentityFaceAnalysisLoader"].__module__]
    face_type = sys.modules[face_module.__name__.rsplit(".nodes.", 1)[0] + ".encoders.face.types"].DetectedFace
    faces = StandInFaces(13, face_type)
    ipa_module.insightface_loader = lambda provider, model_name="buffalo_l": faces
    face_module.face_core.create_analyzer = lambda backend, **kwargs: faces
    return classes


def place_files(models: Path, work: Path, prompts: list[dict], layouts) -> None:
    """models/ and input/ under ``work`` with every file the prompts name, registered with folder_paths."""
    import folder_paths
    base = work / "base"
    for sub in ("checkpoints", "ipadapter", "loras", "clip_vision"):
        (base / sub).mkdir(parents=True, exist_ok=True)
        folder_paths.add_model_folder_path(sub, str(base / sub), is_default=True)
    for layout in layouts:
        for name in IPADAPTER_FILES[layout]:
            (base / "ipadapter" / name).symlink_to(models / "ipadapter" / name)
    for lora in (models / "loras").iterdir():
        (base / "loras" / lora.name).symlink_to(lora)
    for name in CLIP_VISION_NAMES:
        (base / "clip_vision" / name).symlink_to(models / "clip_vision" / "omniid_small_clip_vision.safetensors")
    inputs = work / "input"
    inputs.mkdir()
    folder_paths.set_input_directory(str(inputs))
    for prompt in prompts:
        for node in prompt.values():
            if node["class_type"] == "CheckpointLoaderSimple":
                name = node["inputs"]["ckpt_name"]
                layout = next(v for k, v in CHECKPOINT_LAYOUTS.items() if name.startswith(k))
                target = base / "checkpoints" / name
                if not target.exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.symlink_to(models / "checkpoints" / f"omniid_ipa_examples_{layout}.safetensors")
            if node["class_type"] == "LoadImage" and not (inputs / node["inputs"]["image"]).exists():
                photo(node["inputs"]["image"]).save(inputs / node["inputs"]["image"])


def shrunk(prompt: dict, tag: str) -> dict:
    """The one rewrite of both twins: 64 x 64, batch 1, 3 steps; latents kept instead of decoded and saved."""
    out = {}
    for node_id, node in prompt.items():
        kind, inputs = node["class_type"], dict(node["inputs"])
        if kind in ("SaveImage", "PreviewImage"):
            continue
        if kind == "EmptyLatentImage":
            inputs.update(width=SIZE, height=SIZE, batch_size=1)
        if kind in ("KSampler", "KSamplerAdvanced", "BasicScheduler"):
            inputs["steps"] = STEPS
        if kind == "ImageScale":          # the image InstructPix2Pix encodes as the latent (CosXL Edit)
            inputs.update(width=SIZE, height=SIZE)
        if kind == "RepeatLatentBatch":
            inputs["amount"] = 1
        if kind == "VAEDecode":
            kind, inputs = CAPTURE, {"samples": inputs["samples"], "key": f"{tag}/{node_id}"}
        out[node_id] = {"class_type": kind, "inputs": inputs}
    return out


def run(comfyui: Path, python: str, only=None) -> dict:
    """{"examples": {name: {"converted", "pairs": {VAEDecode id: rel L2}, "effect": {...}, "worst"}},
    "not_run": {...}}: each pair IPAdapter_plus's latent against the converted twin's."""
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import execution

    from omniid.cli.convert import convert
    chosen = [name for name in RUNS if only is None or name in only]
    layouts = sorted({RUNS[name] for name in chosen})
    models = build_models(comfyui, python, layouts)
    work = assets.scratch_dir("omniid-ipa-examples-")
    serve_small_clip_vision(models / "clip_vision" / "omniid_small_clip_vision.safetensors")   # before the packs
    classes = load_packs(work)                                                                   # import its load
    workflows = examples()
    twins = {}
    for name in chosen:
        converted, plan = convert(workflows[name])
        twins[name] = (api_prompt(workflows[name], classes), api_prompt(converted, classes), not plan.skipped)
    place_files(models, work, [p for pair in twins.values() for p in pair[:2]], layouts)
    options = {}
    if "cache_args" in inspect.signature(execution.PromptExecutor).parameters:
        options = dict(cache_type=execution.CacheType.CLASSIC, cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
    executor = execution.PromptExecutor(_Server(), **options)
    results = {}
    for name in chosen:
        original, converted, complete = twins[name]
        stem = name[:-len(".json")]
        KeepLatent.KEPT.clear()
        seconds = {}
        for tag, prompt in (("ipadapter_plus", original), ("converted", converted),
                            ("without", without_ipadapter(original))):
            start = time.perf_counter()
            execute(executor, shrunk(prompt, tag))
            seconds[tag] = round(time.perf_counter() - start, 1)
        keys = sorted(k.split("/", 1)[1] for k in KeepLatent.KEPT if k.startswith("ipadapter_plus/"))
        pairs = {k: relative(KeepLatent.KEPT[f"converted/{k}"], KeepLatent.KEPT[f"ipadapter_plus/{k}"]) for k in keys}
        effect = {k: relative(KeepLatent.KEPT[f"without/{k}"], KeepLatent.KEPT[f"ipadapter_plus/{k}"]) for k in keys}
        finite = all(bool(torch.isfinite(v).all()) for v in KeepLatent.KEPT.values())
        results[stem] = {"converted": complete, "pairs": pairs, "effect": effect, "finite": finite,
                         "worst": max(pairs.values()), "layout": RUNS[name], "seconds": seconds}
        print(f"{stem:40s} {RUNS[name]}  {len(pairs)} image(s)  worst latent rel L2 {max(pairs.values()):.2e}  "
              f"(IPAdapter_plus vs none: {min(effect.values()):.2e} to {max(effect.values()):.2e}; seconds {seconds})",
              flush=True)
    return {"examples": results, "not_run": NOT_RUN, "ipadapter_plus_commit": COMMIT, "size": SIZE, "steps": STEPS}
