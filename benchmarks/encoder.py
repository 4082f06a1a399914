"""Omni-ID Encode for N = 1..8 photos against N plain CLIP forwards, on the same CLIP, in one run.

Encode = CLIP penultimate tokens of the N photos + the Omni-ID aggregation (4
cross-attention + 2 self-attention blocks over N x 257 keys). The ratio
encode / CLIP is the aggregation overhead; the goal is <= 1.05 at N = 8 with CLIP-H,
and Encode time linear in N.

    .venv/bin/python benchmarks/encoder.py            # CLIP-H (ViT-H-14) at full size
    .venv/bin/python benchmarks/encoder.py --quick    # ViT-B-16 and a 768-wide encoder, < 1 min

Weights are random (only time is measured). Last line: RESULT {json}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from omniid.encoders.clip_features import OpenCLIPTokens
from omniid.encoders.omni_id import EncoderConfig, create_encoder


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="ViT-B-16 and a 768-wide encoder (CPU, < 1 min)")
    parser.add_argument("--max-n", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=None, help="timings per N (median is reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    import open_clip
    model_name = "ViT-B-16" if args.quick else "ViT-H-14"
    repeats = args.repeats or (2 if args.quick else 3)
    torch.manual_seed(0)
    clip = OpenCLIPTokens(open_clip.create_model(model_name, pretrained=None), args.device)
    width = clip.visual.transformer.width
    config = EncoderConfig(clip_dim=width, dim=width, num_heads=width // 64)
    encoder = create_encoder(config, seed=0).eval().to(args.device)
    print(f"CLIP {model_name} (width {width}), Omni-ID encoder {config.cross_depth} cross + {config.self_depth} "
          f"self blocks, dim {config.dim}, {config.num_queries} queries; device {args.device}, "
          f"{torch.get_num_threads()} threads, median of {repeats}", flush=True)

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def clip_only(photos):
        clip(photos)
        sync()

    def encode(photos):
        with torch.no_grad():
            encoder(clip_tokens=clip(photos)[None])
        sync()

    photos_all = torch.rand(args.max_n, 224, 224, 3)
    encode(photos_all[:1])                                     # warm-up
    clip_s, encode_s, ratios = {}, {}, {}
    for n in range(1, args.max_n + 1):
        photos = photos_all[:n]
        pairs = [(timed(lambda: clip_only(photos)), timed(lambda: encode(photos))) for _ in range(repeats)]
        clip_s[n] = statistics.median(p[0] for p in pairs)
        encode_s[n] = statistics.median(p[1] for p in pairs)
        ratios[n] = statistics.median(p[1] / p[0] for p in pairs)
        print(f"N={n}: CLIP {clip_s[n]:.3f} s, Encode {encode_s[n]:.3f} s, ratio {ratios[n]:.3f}", flush=True)

    ns = list(encode_s)
    mean_n, mean_t = statistics.fmean(ns), statistics.fmean(encode_s.values())
    slope = sum((n - mean_n) * (encode_s[n] - mean_t) for n in ns) / sum((n - mean_n) ** 2 for n in ns)
    intercept = mean_t - slope * mean_n
    residual = sum((encode_s[n] - (intercept + slope * n)) ** 2 for n in ns)
    total = sum((encode_s[n] - mean_t) ** 2 for n in ns)
    r2 = 1.0 - residual / total if total > 0 else 1.0
    print(f"Encode time ~ {intercept:.3f} + {slope:.3f} * N seconds (R^2 {r2:.4f})")
    result = {"ratio": round(ratios[args.max_n], 4), "ratios": {str(k): round(v, 4) for k, v in ratios.items()},
              "encode_seconds": {str(k): round(v, 4) for k, v in encode_s.items()},
              "clip_seconds": {str(k): round(v, 4) for k, v in clip_s.items()},
              "linear_r2": round(r2, 4), "seconds_per_photo": round(slope, 4), "clip": model_name,
              "device": args.device, "quick": args.quick}
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
