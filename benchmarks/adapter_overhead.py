"""Sampling time and peak memory with an identity adapter over without: same model, same run.

Builds ComfyUI's SD1.5 UNet (the real architecture: 16 cross-attention layers; random
weights, so only cost is meaningful), and samples with ComfyUI's own sampler (euler,
CFG, both branches) plain and with an Omni-ID adapter (256 identity tokens of width
1280 on every cross-attention layer), alternating the two. Needs ComfyUI: run it with
the Python that runs ComfyUI, or it re-runs itself with $COMFYUI_PATH's.

    .venv/bin/python benchmarks/adapter_overhead.py            # 512 x 512, 8 steps, 3 repeats
    .venv/bin/python benchmarks/adapter_overhead.py --quick    # 192 x 192, 2 steps, under a minute

Memory: on a GPU the peak of torch.cuda.max_memory_allocated; on the CPU the peak resident
set size of this process, sampled every 2 ms. Last line: RESULT {json}.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent.parent
SD15_UNET = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
             "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
             "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
             "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
             "context_dim": 768, "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
             "use_temporal_attention": False, "use_temporal_resblock": False}


def ensure_comfyui() -> Path:
    """ComfyUI on sys.path, re-running this script with ComfyUI's Python when needed."""
    spec = importlib.util.spec_from_file_location("omniid", PACK_ROOT / "omniid" / "__init__.py",
                                                  submodule_search_locations=[str(PACK_ROOT / "omniid")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["omniid"] = module
    spec.loader.exec_module(module)
    from omniid.comfy_server import comfyui_python, find_comfyui
    comfyui = find_comfyui()
    if comfyui is None:
        sys.exit("ComfyUI not found: set COMFYUI_PATH")
    python = comfyui_python(comfyui)
    if os.path.realpath(sys.prefix) != os.path.realpath(
            subprocess.run([python, "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True).stdout.strip()):
        os.execv(python, [python, *sys.argv])
    sys.path.insert(0, str(comfyui))
    return comfyui


class PeakMemory:
    """Peak memory while inside the block: CUDA allocator peak, or sampled process RSS."""

    def __init__(self, device):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.002)

    def __enter__(self):
        import torch
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak = self.rss()
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        import torch
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--size", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--identity-tokens", type=int, default=256)
    args = parser.parse_args()
    size = args.size or (192 if args.quick else 512)
    steps = args.steps or (2 if args.quick else 8)
    repeats = args.repeats or (2 if args.quick else 3)

    ensure_comfyui()
    sys.argv = sys.argv[:1]
    import comfy.cli_args
    import torch
    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sample
    import comfy.supported_models
    from omniid.pack import import_pack
    import_pack()
    from omni_identity.encoders.embeds import IdentityEmbeds
    from omni_identity.guidance.adapter import AdapterConfig, create_adapter
    from omni_identity.nodes.hosts import apply_identity, unet_layers

    device = mm.get_torch_device()
    config = comfy.supported_models.SD15(dict(SD15_UNET))
    config.set_inference_dtype(torch.float16 if device.type == "cuda" else torch.float32, None)
    base = config.get_model({})
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in base.diffusion_model.parameters():
            param.normal_(0.0, 0.02, generator=generator)
    model = comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=torch.device("cpu"))
    layers = unet_layers(model)
    adapter = create_adapter(AdapterConfig(family="unet", token_dim=1280, layer_dims=tuple(l.inner_dim for l in layers)),
                             seed=1)
    embeds = IdentityEmbeds("omni_id", {"tokens": torch.randn(args.identity_tokens, 1280, generator=generator)},
                            {"num_images": 1})
    patched = apply_identity(model, adapter, adapter.identity_tokens(embeds), 1.0, 0.0, 1.0)

    positive = [[torch.randn(1, 77, 768, generator=generator), {}]]
    negative = [[torch.randn(1, 77, 768, generator=generator), {}]]
    latent = torch.zeros(1, 4, size // 8, size // 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(2))

    def sample(m):
        return comfy.sample.sample(m, noise, steps, 5.0, "euler", "normal", positive, negative, latent,
                                   disable_pbar=True, seed=2)

    print(f"SD1.5 UNet ({len(layers)} cross-attention layers), {size} x {size}, {steps} euler steps with CFG, "
          f"{args.identity_tokens} identity tokens; device {device}, {torch.get_num_threads()} threads", flush=True)
    sample(model)                                            # warm-up: load weights, allocate
    sample(patched)
    seconds = {"plain": [], "adapter": []}
    peaks = {"plain": [], "adapter": []}
    for r in range(repeats):
        for name, m in (("plain", model), ("adapter", patched)):
            with PeakMemory(device) as memory:
                start = time.perf_counter()
                sample(m)
                seconds[name].append(time.perf_counter() - start)
            peaks[name].append(memory.peak)
            print(f"  {name:8s} run {r + 1}: {seconds[name][-1]:.2f} s, peak {memory.peak / 2**20:.0f} MiB", flush=True)
    ratio = statistics.median(seconds["adapter"]) / statistics.median(seconds["plain"])
    mem_ratio = max(peaks["adapter"]) / max(peaks["plain"])
    print(f"time ratio {ratio:.3f} (goal <= 1.10), peak memory ratio {mem_ratio:.3f}")
    print("RESULT " + json.dumps({
        "ratio": round(ratio, 4), "peak_mem_ratio": round(mem_ratio, 4),
        "plain_seconds": round(statistics.median(seconds["plain"]), 3),
        "adapter_seconds": round(statistics.median(seconds["adapter"]), 3),
        "size": size, "steps": steps, "identity_tokens": args.identity_tokens, "device": str(device),
        "quick": args.quick}))


if __name__ == "__main__":
    main()
