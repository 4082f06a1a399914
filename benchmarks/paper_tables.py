"""The three papers' tables, reproduced in structure by driving a ComfyUI through its HTTP API.

- omni_id:     ID similarity vs 1 / 3 / 5 / 7 input photos for ArcFace, CLIP, ArcFace+CLIP and
               Omni-ID (each with its adapter), against the identity's photos.
- infinite_id: CLIP-T, CLIP-I and face similarity for the identity adapter alone, Infinite-ID's
               mixed attention, and mixed attention + AdaIN-mean.
- omniportrait: CLIP-T, CLIP-I and SIM for the adapter alone and with RB-Guidance, plus
               FID-ready image dumps (one folder per method) for an external FID tool.

Real runs give weights and data as arguments (see --help): a ComfyUI (--server URL or
--comfyui PATH), its checkpoint and CLIP-H names, per method an encoder and adapter file
(--method NAME=ENCODER:ADAPTER), identity folders (--identities DIR/<person>/*.jpg),
prompts (--prompts FILE), an open_clip model for CLIP-T/CLIP-I (--open-clip NAME:CHECKPOINT).

    .venv/bin/python benchmarks/paper_tables.py --tiny

runs everything end to end on this machine with the tiny random test models and the test
photos, to prove the harness: the figures are then meaningless (random weights make noise
images, in which no face is found), and the output says so.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import support_path  # noqa: F401  (test assets)
from omniid.cli.client import ComfyClient
from support.graph import Graph
from omniid.cli.server import ComfyServer, comfyui_python, find_comfyui
from omniid.encoders.face import create_analyzer
from omniid.training.metrics import clip_image_similarity, clip_text_similarity, face_embeddings, identity_report
from support import assets
from support.testing import populate_base, start_server

OMNI_METHODS = ("arcface", "clip", "arcface_clip", "omni_id")
INPUT_COUNTS = (1, 3, 5, 7)
TABLES = ("omni_id", "infinite_id", "omniportrait")


@dataclass
class Setup:
    client: ComfyClient
    checkpoint: str
    clip_vision: str
    face_backend: str
    arcface_model: str
    methods: dict[str, tuple[str | None, str]]         # name -> (encoder file or None, adapter file)
    identities: dict[str, list[Path]]                   # person -> local photo paths
    prompts: list[str]
    size: int = 512
    steps: int = 30
    cfg: float = 5.0
    feature_block: int = 6                              # RB-Guidance's DIFT block (6 for SD1.5)
    output: Path = Path("paper-tables")
    uploaded: dict[Path, str] = field(default_factory=dict)

    def upload(self, path: Path) -> str:
        if path not in self.uploaded:
            self.uploaded[path] = self.client.upload_image(path)
        return self.uploaded[path]


def photos_node(g: Graph, setup: Setup, photos: list[Path]):
    """The photos as one batch, each resized to 512 x 512 (aspect kept by the face crop later)."""
    batch = None
    for path in photos:
        image = g.out(g.add("ImageScale", image=g.out(g.add("LoadImage", image=setup.upload(path))),
                            upscale_method="lanczos", width=512, height=512, crop="center"))
        batch = image if batch is None else g.out(g.add("ImageBatch", image1=batch, image2=image))
    return batch


def identity_embeds(g: Graph, setup: Setup, method: str, photos: list[Path]):
    encoder_file, _ = setup.methods[method]
    faces = g.out(g.add("OmniIdentityFaceAnalysisLoader", backend=setup.face_backend, provider="CPU", det_size=640,
                        arcface_model=setup.arcface_model))
    clip = g.out(g.add("CLIPVisionLoader", clip_name=setup.clip_vision))
    images = photos_node(g, setup, photos)
    if method == "omni_id":
        encoder = g.out(g.add("OmniIdentityEncoderLoader", encoder_name=encoder_file))
        return g.out(g.add("OmniIdentityEncode", encoder=encoder, clip_vision=clip, images=images, face_analysis=faces))
    inputs = dict(method=method, images=images, face_analysis=faces, clip_vision=clip)
    if encoder_file:
        inputs["encoder"] = g.out(g.add("OmniIdentityEncoderLoader", encoder_name=encoder_file))
    return g.out(g.add("OmniIdentityEncodeBaseline", **inputs))


def generate(setup: Setup, method: str, photos: list[Path], prompt: str, seed: int, mode: str = "adapter") -> np.ndarray:
    """One image of the identity for ``prompt``: the method's adapter, optionally with mixed
    attention (+ AdaIN-mean) or RB-Guidance. Returns RGB uint8."""
    g = Graph()
    ckpt = g.checkpoint(setup.checkpoint)
    embeds = identity_embeds(g, setup, method, photos)
    adapter = g.out(g.add("OmniIdentityAdapterLoader", adapter_name=setup.methods[method][1]))
    schedule = dict(weight=1.0, start_at=0.0, end_at=1.0)
    if mode.startswith("mixed"):
        model = g.out(g.add("OmniIdentityMixedAttention", model=g.out(ckpt, 0), adapter=adapter, embeds=embeds,
                            **schedule))
        if mode == "mixed_adain":
            model = g.out(g.add("OmniIdentityAdaINMean", model=model, strength=1.0))
    else:
        model = g.out(g.add("OmniIdentityApplyAdapter", model=g.out(ckpt, 0), adapter=adapter, embeds=embeds,
                            **schedule))
    if mode == "rb":
        pos = g.add("CLIPTextEncode", clip=g.out(ckpt, 1), text=prompt)
        neg = g.add("CLIPTextEncode", clip=g.out(ckpt, 1), text="blurry, lowres")
        faces = g.out(g.add("OmniIdentityFaceAnalysisLoader", backend=setup.face_backend, provider="CPU",
                            det_size=640))
        guider = g.add("OmniIdentityRBGuidance", model=model, positive=g.out(pos), negative=g.out(neg),
                       cfg=setup.cfg, reference=photos_node(g, setup, photos[:1]), vae=g.out(ckpt, 2),
                       strength=8.5, start_fraction=0.6, t0=671, face_analysis=faces,
                       feature_block=setup.feature_block, clip=g.out(ckpt, 1), prompt=prompt)
        sampled = g.add("SamplerCustomAdvanced", noise=g.out(g.add("RandomNoise", noise_seed=seed)),
                        guider=g.out(guider, 0), sampler=g.out(g.add("KSamplerSelect", sampler_name="euler")),
                        sigmas=g.out(g.add("BasicScheduler", model=model, scheduler="normal", steps=setup.steps,
                                           denoise=1.0)),
                        latent_image=g.out(g.add("EmptyLatentImage", width=setup.size, height=setup.size,
                                                 batch_size=1)))
        decoded = g.add("VAEDecode", samples=g.out(sampled, 0), vae=g.out(ckpt, 2))
        save = g.add("SaveImage", images=g.out(decoded), filename_prefix="paper_tables/rb")
    else:
        save = g.sd_sampling(model=model, ckpt=ckpt, seed=seed, steps=setup.steps, cfg=setup.cfg, size=setup.size,
                             prefix=f"paper_tables/{mode}", positive=prompt, negative="blurry, lowres")["save"]
    result = setup.client.run(g.nodes, timeout=3600)
    from PIL import Image
    file = next(f for f in result.files() if f["node"] == save)
    return np.asarray(Image.open(io.BytesIO(setup.client.view(file))).convert("RGB"))


def as_batch(images: list[np.ndarray]):
    import torch
    return [torch.from_numpy(i.astype(np.float32) / 255.0) for i in images]


class Scorer:
    """ID similarity with the face analysis; CLIP-T / CLIP-I with an open_clip model."""

    def __init__(self, analyzer, clip_scorer):
        self.analyzer, self.clip = analyzer, clip_scorer

    def identity(self, generated: list[np.ndarray], references: list[Path]):
        gen, kind = face_embeddings(as_batch(generated), self.analyzer)
        refs, ref_kind = face_embeddings(as_batch([assets.load_photo(p) for p in references]), self.analyzer)
        return identity_report(gen, [r for r in refs if r is not None], kind or ref_kind)

    def clip_scores(self, generated: list[np.ndarray], references: list[Path], prompts: list[str]):
        import torch
        images = self.clip.image_embeds(torch.stack([self._square(i) for i in generated]))
        refs = self.clip.image_embeds(torch.stack([self._square(assets.load_photo(p)) for p in references]))
        texts = self.clip.text_embeds(prompts)
        return float(clip_text_similarity(images, texts).mean()), float(clip_image_similarity(images, refs).mean())

    @staticmethod
    def _square(image: np.ndarray):
        import torch
        from PIL import Image
        picture = Image.fromarray(image).resize((224, 224), Image.BICUBIC)
        return torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0)


def fmt(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.3f}"


def print_table(title: str, columns: list[str], rows: dict[str, list], note: str = "") -> None:
    width = max(12, *(len(c) + 2 for c in columns))
    first = max(16, *(len(r) + 2 for r in rows))
    print(f"\n{title}")
    print("".ljust(first) + "".join(c.rjust(width) for c in columns))
    for name, values in rows.items():
        print(name.ljust(first) + "".join(fmt(v).rjust(width) for v in values))
    if note:
        print(note)


def omni_id_table(setup: Setup, scorer: Scorer) -> dict:
    rows = {}
    for method in [m for m in OMNI_METHODS if m in setup.methods]:
        rows[method] = []
        for count in INPUT_COUNTS:
            scores = []
            for person, photos in setup.identities.items():
                if len(photos) < count:
                    continue
                inputs = photos[:count]
                targets = photos[count:] or photos          # held-out photos; all of them when none is left
                images = [generate(setup, method, inputs, prompt, seed=i) for i, prompt in enumerate(setup.prompts)]
                report = scorer.identity(images, targets)
                scores.extend(report.scored)
            rows[method].append(float(np.mean(scores)) if scores else None)
    print_table("Omni-ID: ID similarity vs number of input photos", [f"{n} inputs" for n in INPUT_COUNTS], rows)
    return rows


def prompt_table(setup: Setup, scorer: Scorer, title: str, modes: dict[str, str], method: str,
                 dump: str | None = None) -> dict:
    rows = {}
    for label, mode in modes.items():
        sims, clip_t, clip_i = [], [], []
        for person, photos in setup.identities.items():
            inputs = photos[:1]
            images = [generate(setup, method, inputs, prompt, seed=i, mode=mode) for i, prompt in
                      enumerate(setup.prompts)]
            if dump:
                folder = setup.output / "fid" / dump / label.replace(" ", "_")
                folder.mkdir(parents=True, exist_ok=True)
                from PIL import Image
                for i, image in enumerate(images):
                    Image.fromarray(image).save(folder / f"{person}_{i:03d}.png")
            sims.extend(scorer.identity(images, photos).scored)
            t, i_ = scorer.clip_scores(images, photos[:1], setup.prompts)
            clip_t.append(t)
            clip_i.append(i_)
        rows[label] = [float(np.mean(clip_t)), float(np.mean(clip_i)), float(np.mean(sims)) if sims else None]
    print_table(title, ["CLIP-T", "CLIP-I", "ID sim"], rows,
                f"FID-ready images: {setup.output / 'fid' / dump}" if dump else "")
    return rows


def tiny_setup(workdir: Path):
    comfyui = find_comfyui()
    if comfyui is None:
        sys.exit("--tiny needs ComfyUI: run ./scripts/setup.sh or set COMFYUI_PATH")
    tiny = assets.tiny_models(comfyui, comfyui_python(comfyui))
    base = populate_base(workdir / "base", tiny, {})
    server = start_server(comfyui, base)
    photos = sorted(assets.identity_photo_set().items())
    identity = [path for name, path in photos if name.startswith("id_")]
    methods = {"arcface": ("omniid_tiny_arcface.safetensors", "omniid_tiny_sd15_arcface.safetensors"),
               "clip": (None, "omniid_tiny_sd15_plus_h94.safetensors"),
               "arcface_clip": ("omniid_tiny_arcface_clip.safetensors", "omniid_tiny_sd15_arcface_clip.safetensors"),
               "omni_id": ("omniid_tiny_omni_id.safetensors", "omniid_tiny_sd15_omni.safetensors")}
    setup = Setup(ComfyClient(server.url), "omniid_tiny_sd15.safetensors", "omniid_random_clip_vit_h.safetensors",
                  "dlib", assets.TEST_ARCFACE_ONNX, methods, {"obama": identity}, ["a photo of a person"],
                  size=64, steps=3, feature_block=1, output=workdir / "out")
    import open_clip
    import torch
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    from omniid.encoders.clip_features import OpenCLIPScorer
    torch.manual_seed(0)
    model = open_clip.model.CLIP(embed_dim=32, vision_cfg=CLIPVisionCfg(layers=2, width=64, head_width=32,
                                                                        patch_size=32, image_size=224),
                                 text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=2,
                                                      layers=2))
    scorer = Scorer(create_analyzer("dlib"), OpenCLIPScorer(model, open_clip.get_tokenizer("ViT-B-32")))
    return setup, scorer, server


def real_setup(args):
    from omniid.encoders.clip_features import OpenCLIPScorer
    server = None
    if args.server:
        url = args.server
    else:
        server = ComfyServer(find_comfyui(args.comfyui), cpu=not args.gpu).start()
        url = server.url
    methods = {}
    for item in args.method or []:
        name, _, files = item.partition("=")
        encoder, _, adapter = files.partition(":")
        methods[name] = (encoder or None, adapter)
    identities = {p.name: sorted(x for x in p.iterdir() if x.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
                  for p in sorted(Path(args.identities).iterdir()) if p.is_dir()}
    prompts = [l.strip() for l in Path(args.prompts).read_text().splitlines() if l.strip()]
    name, _, checkpoint = args.open_clip.partition(":")
    scorer = Scorer(create_analyzer(args.face_backend, arcface_model=args.arcface_model or None,
                                    insightface_roots=args.insightface_root or []),
                    OpenCLIPScorer.load(name, checkpoint or None, "cuda" if args.gpu else "cpu"))
    setup = Setup(ComfyClient(url), args.checkpoint, args.clip_vision, args.face_backend, args.arcface_model or "none",
                  methods, identities, prompts, size=args.size, steps=args.steps,
                  feature_block=args.feature_block, output=Path(args.output))
    return setup, scorer, server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--tiny", action="store_true", help="tiny random models and the test photos, on this machine")
    parser.add_argument("--tables", default=",".join(TABLES), help="comma-separated: " + ", ".join(TABLES))
    parser.add_argument("--server", help="URL of a running ComfyUI")
    parser.add_argument("--comfyui", help="ComfyUI checkout to start (default $COMFYUI_PATH)")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--checkpoint", help="checkpoint name in models/checkpoints")
    parser.add_argument("--clip-vision", help="CLIP-H name in models/clip_vision")
    parser.add_argument("--method", action="append", metavar="NAME=ENCODER:ADAPTER",
                        help="arcface, clip, arcface_clip or omni_id with its encoder (may be empty) and adapter")
    parser.add_argument("--identities", help="folder of identity folders with photos")
    parser.add_argument("--prompts", help="text file, one prompt per line")
    parser.add_argument("--open-clip", default="ViT-H-14", help="open_clip model NAME[:CHECKPOINT] for CLIP-T/I")
    parser.add_argument("--face-backend", default="dlib", help="dlib or insightface/<pack>")
    parser.add_argument("--arcface-model", default="", help="ArcFace .onnx for the dlib backend")
    parser.add_argument("--insightface-root", action="append", help="folder holding models/<pack>")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--feature-block", type=int, default=6, help="RB-Guidance DIFT block (SD1.5: 6)")
    parser.add_argument("--output", default="paper-tables")
    args = parser.parse_args()
    tables = [t.strip() for t in args.tables.split(",") if t.strip()]
    unknown = set(tables) - set(TABLES)
    if unknown:
        parser.error(f"unknown tables {sorted(unknown)}")
    workdir = Path(tempfile.mkdtemp(prefix="paper-tables-"))
    if args.tiny:
        setup, scorer, server = tiny_setup(workdir)
        print("TINY RUN: random weights and 64 px images; the harness runs end to end, the figures are "
              "meaningless (no face is found in noise images, so ID similarity reads n/a).")
    else:
        missing = [n for n in ("checkpoint", "clip_vision", "identities", "prompts") if not getattr(args, n)]
        if missing or not args.method:
            parser.error(f"a real run needs --{', --'.join(m.replace('_', '-') for m in missing) or 'method'}")
        setup, scorer, server = real_setup(args)
    results = {}
    try:
        if "omni_id" in tables:
            results["omni_id"] = omni_id_table(setup, scorer)
        adapter_method = "omni_id" if "omni_id" in setup.methods else next(iter(setup.methods))
        if "infinite_id" in tables:
            results["infinite_id"] = prompt_table(setup, scorer, "Infinite-ID: prompt fidelity and identity",
                                                  {"adapter only": "adapter", "mixed attention": "mixed",
                                                   "mixed + AdaIN-mean": "mixed_adain"}, adapter_method)
        if "omniportrait" in tables:
            results["omniportrait"] = prompt_table(setup, scorer, "OmniPortrait: prompt fidelity and identity",
                                                   {"adapter only": "adapter", "with RB-Guidance": "rb"},
                                                   adapter_method, dump="omniportrait")
    finally:
        if server is not None:
            server.cleanup()
    print("\nRESULT " + json.dumps({"tiny": args.tiny, "tables": results}))


if __name__ == "__main__":
    main()
