"""Shared harness of the sampling benchmarks: ComfyUI's SD1.5 UNet with random weights,
sampled with ComfyUI's own sampler, a baseline and a variant alternating in one run."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

SD15_UNET = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
             "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
             "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
             "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
             "context_dim": 768, "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
             "use_temporal_attention": False, "use_temporal_resblock": False}


def ensure_comfyui() -> Path:
    """ComfyUI on sys.path, re-running this script with ComfyUI's Python when needed."""
    from omniid.cli.provision import comfyui_python, find_comfyui
    comfyui = find_comfyui()
    if comfyui is None:
        sys.exit("ComfyUI not found: run ./scripts/setup.sh or set COMFYUI_PATH")
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



def attention_backend() -> str:
    import comfy.ldm.modules.attention as attention
    return attention.optimized_attention.__name__


def build_sd15(torch, size: int):
    """(ModelPatcher of a random-weight SD1.5 UNet, sample(model) function, device)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sample
    import comfy.supported_models
    device = mm.get_torch_device()
    config = comfy.supported_models.SD15(dict(SD15_UNET))
    config.set_inference_dtype(torch.float16 if device.type == "cuda" else torch.float32, None)
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():          # as ComfyUI's loaders run: the weights are inference tensors
        base = config.get_model({})
        for param in base.diffusion_model.parameters():
            param.normal_(0.0, 0.02, generator=generator)
    model = comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=torch.device("cpu"))
    positive = [[torch.randn(1, 77, 768, generator=generator), {}]]
    negative = [[torch.randn(1, 77, 768, generator=generator), {}]]
    latent = torch.zeros(1, 4, size // 8, size // 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(2))

    def sample(m, steps):
        return comfy.sample.sample(m, noise, steps, 5.0, "euler", "normal", positive, negative, latent,
                                   disable_pbar=True, seed=2)

    sample.inputs = {"positive": positive, "negative": negative, "latent": latent, "noise": noise}
    return model, sample, device


def setup_comfyui():
    """ComfyUI importable on the CPU (or its GPU), and the pack importable as omniid."""
    ensure_comfyui()
    sys.argv = sys.argv[:1]
    import comfy.cli_args
    import torch
    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    # PyTorch's SDPA, as ComfyUI uses on GPUs (on the CPU it would pick its chunked sub-quadratic attention)
    comfy.cli_args.args.use_pytorch_cross_attention = True
    return torch


def compare(baseline, variant, repeats: int, device, names=("plain", "variant")) -> dict:
    """Alternate two zero-argument sampling runs; median time ratio and peak memory ratio."""
    baseline()                                                 # warm-up: load weights, allocate
    variant()
    seconds = {name: [] for name in names}
    cpu = {name: [] for name in names}            # process CPU time: steadier than wall time on a shared CPU
    peaks = {name: [] for name in names}
    for r in range(repeats):
        for name, run in zip(names, (baseline, variant)):
            with PeakMemory(device) as memory:
                start, start_cpu = time.perf_counter(), time.process_time()
                run()
                seconds[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
            peaks[name].append(memory.peak)
            print(f"  {name:8s} run {r + 1}: {seconds[name][-1]:.2f} s ({cpu[name][-1]:.2f} s CPU), peak "
                  f"{memory.peak / 2**20:.0f} MiB", flush=True)
    base, var = names
    return {"ratio": statistics.median(seconds[var]) / statistics.median(seconds[base]),
            "cpu_time_ratio": statistics.median(cpu[var]) / statistics.median(cpu[base]),
            "peak_mem_ratio": max(peaks[var]) / max(peaks[base]),
            f"{base}_seconds": statistics.median(seconds[base]), f"{var}_seconds": statistics.median(seconds[var])}


def parse_args(description: str, quick: tuple[int, int, int], full: tuple[int, int, int], add_arguments=None):
    """--quick/--size/--steps/--repeats, resolved from (size, steps, repeats) defaults."""
    import argparse
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="the small, under-a-minute setting")
    parser.add_argument("--size", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--repeats", type=int)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args()
    defaults = quick if args.quick else full
    args.size, args.steps, args.repeats = (given or default for given, default in
                                           zip((args.size, args.steps, args.repeats), defaults))
    return args


def report(result: dict, goal: float, extra: dict) -> None:
    print(f"time ratio {result['ratio']:.3f} (goal <= {goal}), peak memory ratio {result['peak_mem_ratio']:.3f}")
    print("RESULT " + json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in {**result, **extra}.items()}))
