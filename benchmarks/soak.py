"""Soak: many mixed prompts through one real ComfyUI server with the pack, interrupts mixed in; does its
memory stay flat?

A server on the tiny test models runs a rotation of the pack's work (face crops, Omni-ID and
baseline encodes with adapters, Infinite-ID mixed attention + AdaIN-mean, RB-Guidance, similarity
reports, a bad input that must be refused) and every eighth prompt is a long sampling run that is
interrupted mid-way. The server's resident memory is read after every prompt. Memory after a prompt
depends on which models that prompt left loaded, so the drift compares like with like: the RSS after
the same kind of prompt (the adapter prompt, the commonest), median of its first three runs after the
warm-up (the first quarter of the prompts, where models load and caches fill to their bounds) against
the median of its last three runs, in percent. Goal: drift <= 3 %, no failures.

    .venv/bin/python benchmarks/soak.py              # 200 prompts
    .venv/bin/python benchmarks/soak.py --quick      # 20 prompts, under two minutes

Last line: RESULT {"prompts": N, "rss_drift_pct": D, "failures": F}.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import support_path  # noqa: F401  (test assets)
from omniid.cli.client import ComfyClient, ExecutionFailed, PromptRejected
from support.graph import Graph
from omniid.cli.provision import comfyui_python, find_comfyui
from support import assets
from support.testing import populate_base, start_server

CLIP = "omniid_random_clip_vit_h.safetensors"
WARMUP_FRACTION = 0.25


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as handle:
        return int(handle.read().split()[1]) * 4096


def faces(g):
    return g.out(g.add("OmniIdentityFaceAnalysisLoader", backend="dlib", provider="CPU", det_size=640))


def omni_embeds(g, photo):
    return g.out(g.add("OmniIdentityEncode",
                       encoder=g.out(g.add("OmniIdentityEncoderLoader",
                                           encoder_name="omniid_tiny_omni_id.safetensors")),
                       clip_vision=g.out(g.add("CLIPVisionLoader", clip_name=CLIP)), images=g.photos(photo),
                       face_analysis=faces(g)))


def face_crop(i):
    g = Graph()
    g.add("PreviewImage", images=g.out(g.add("OmniIdentityFaceCrop", image=g.photos(f"id_{i % 7 + 1}.png"),
                                             face_analysis=faces(g), crop_size=224, padding=0.25,
                                             selection="largest"), 0))
    return g, "ok"


def adapter(i):
    g = Graph()
    ckpt = g.checkpoint()
    model = g.out(g.add("OmniIdentityApplyAdapter", model=g.out(ckpt, 0),
                        adapter=g.out(g.add("OmniIdentityAdapterLoader",
                                            adapter_name="omniid_tiny_sd15_omni.safetensors")),
                        embeds=omni_embeds(g, f"id_{i % 7 + 1}.png"), weight=1.0, start_at=0.0, end_at=1.0))
    g.sd_sampling(model=model, ckpt=ckpt, seed=i, steps=3, prefix="soak/adapter")
    return g, "ok"


def baseline(i):
    g = Graph()
    ckpt = g.checkpoint()
    embeds = g.out(g.add("OmniIdentityEncodeBaseline", method="clip", images=g.photos(f"id_{i % 7 + 1}.png"),
                         clip_vision=g.out(g.add("CLIPVisionLoader", clip_name=CLIP))))
    model = g.out(g.add("OmniIdentityMixedAttention", model=g.out(ckpt, 0),
                        adapter=g.out(g.add("OmniIdentityAdapterLoader",
                                            adapter_name="omniid_tiny_sd15_plus_h94.safetensors")),
                        embeds=embeds, weight=1.0, start_at=0.0, end_at=1.0))
    model = g.out(g.add("OmniIdentityAdaINMean", model=model, strength=0.7))
    g.sd_sampling(model=model, ckpt=ckpt, seed=i, steps=2, prefix="soak/mixed")
    return g, "ok"


def rb_guidance(i):
    g = Graph()
    ckpt = g.checkpoint()
    text = "a photo of a man"
    pos = g.add("CLIPTextEncode", clip=g.out(ckpt, 1), text=text)
    neg = g.add("CLIPTextEncode", clip=g.out(ckpt, 1), text="blurry")
    guider = g.add("OmniIdentityRBGuidance", model=g.out(ckpt, 0), positive=g.out(pos), negative=g.out(neg),
                   cfg=5.0, reference=g.photos(f"id_{i % 7 + 1}.png"), vae=g.out(ckpt, 2), strength=8.5,
                   start_fraction=0.6, t0=671, feature_block=1, clip=g.out(ckpt, 1), prompt=text)
    sampled = g.add("SamplerCustomAdvanced", noise=g.out(g.add("RandomNoise", noise_seed=i)), guider=g.out(guider),
                    sampler=g.out(g.add("KSamplerSelect", sampler_name="euler")),
                    sigmas=g.out(g.add("BasicScheduler", model=g.out(ckpt, 0), scheduler="normal", steps=3,
                                       denoise=1.0)),
                    latent_image=g.out(g.add("EmptyLatentImage", width=64, height=64, batch_size=1)))
    g.add("PreviewImage", images=g.out(g.add("VAEDecode", samples=g.out(sampled), vae=g.out(ckpt, 2))))
    return g, "ok"


def similarity(i):
    g = Graph()
    g.add("PreviewImage", images=g.out(g.add("OmniIdentitySimilarity", face_analysis=faces(g),
                                             images=g.photos(f"id_{i % 7 + 1}.png"),
                                             reference_images=g.photos("id_1.png")), 0))
    return g, "ok"


def bad_input(i):
    g = Graph()
    ckpt = g.checkpoint()
    model = g.out(g.add("OmniIdentityApplyAdapter", model=g.out(ckpt, 0),
                        adapter=g.out(g.add("OmniIdentityAdapterLoader",
                                            adapter_name="omniid_tiny_sd15_omni.safetensors")),
                        embeds=omni_embeds(g, "id_1.png"), weight=math.nan, start_at=0.0, end_at=1.0))
    g.sd_sampling(model=model, ckpt=ckpt, steps=2, prefix="soak/bad")
    return g, "rejected"


def interrupted(i):
    g = Graph()
    g.sd_sampling(steps=5000, seed=i, prefix="soak/interrupted")
    return g, "interrupted"


ROTATION = (face_crop, adapter, baseline, rb_guidance, similarity, adapter, bad_input)


def run_one(client: ComfyClient, kind: str, graph: Graph) -> bool:
    """True when the prompt ended as its kind expects."""
    if kind == "interrupted":
        prompt_id = client.queue_prompt(graph.nodes)
        deadline = time.monotonic() + 60
        while not client.queue_state().get("queue_running") and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        client.cancel(prompt_id)
        try:
            client.wait(prompt_id, timeout=120)
        except ExecutionFailed as exc:
            return exc.interrupted
        return False
    try:
        client.run(graph.nodes, timeout=600)
        return kind == "ok"
    except PromptRejected:
        return kind == "rejected"
    except ExecutionFailed:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 prompts")
    parser.add_argument("--prompts", type=int)
    args = parser.parse_args()
    total = args.prompts or (20 if args.quick else 200)
    comfyui = find_comfyui()
    if comfyui is None:
        raise SystemExit("ComfyUI not found: run ./scripts/setup.sh or set COMFYUI_PATH")
    tiny = assets.tiny_models(comfyui, comfyui_python(comfyui))
    photos = {name: path for name, path in assets.identity_photo_set().items() if name.startswith("id_")}
    base = populate_base(Path(tempfile.mkdtemp(prefix="omniid-soak-")), tiny, photos)
    server = start_server(comfyui, base)
    client = ComfyClient(server.url)
    warmup = max(1, int(total * WARMUP_FRACTION))
    samples, probes, failures, start = [], [], 0, time.monotonic()
    try:
        for i in range(total):
            build = interrupted if i % 8 == 7 else ROTATION[i % len(ROTATION)]
            graph, kind = build(i)
            ok = run_one(client, kind, graph)
            failures += 0 if ok else 1
            samples.append(rss(server.process.pid))
            if build is adapter and i >= warmup:
                probes.append(samples[-1])
            print(f"{i + 1:4d}/{total} {build.__name__:12s} {'ok' if ok else 'FAILED':6s} "
                  f"rss {samples[-1] / 2**20:8.1f} MiB", flush=True)
            if not server.alive():
                raise SystemExit(f"the server died at prompt {i + 1}:\n{server.log_tail()}")
    finally:
        server.cleanup()
    if len(probes) < 2:
        raise SystemExit("too few prompts to compare memory after the warm-up; run more")
    warm, end = statistics.median(probes[:3]), statistics.median(probes[-3:])
    drift = 100.0 * (end - warm) / warm
    print(f"{total} prompts in {time.monotonic() - start:.0f} s; RSS after the adapter prompt: {warm / 2**20:.1f} MiB "
          f"after the warm-up ({warmup} prompts), {end / 2**20:.1f} MiB at the end (median of 3 each): drift "
          f"{drift:+.2f} % (goal <= 3 %); range over all prompts {min(samples) / 2**20:.0f}-"
          f"{max(samples) / 2**20:.0f} MiB; failures {failures}")
    print("RESULT " + json.dumps({"prompts": total, "rss_drift_pct": round(drift, 2), "failures": failures}))


if __name__ == "__main__":
    main()
