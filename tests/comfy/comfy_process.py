"""The start of every in-process check script here (run as ``python tests/comfy/SCRIPT.py --comfyui DIR ...``
with the Python that runs that ComfyUI): its arguments parsed, ComfyUI and tests/ (``support``) importable,
ComfyUI's own argument parser kept off this script's arguments, and ComfyUI on the CPU."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional

TESTS = Path(__file__).resolve().parents[1]


def start(add_arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None,
          threads: Optional[int] = None) -> argparse.Namespace:
    """``threads``: torch's thread count (1: a tiny model runs faster on one thread of a shared CPU)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--comfyui", required=True)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(args.comfyui).resolve()))
    sys.path.insert(0, str(TESTS))            # the script's own folder, tests/comfy, is already first
    sys.argv = sys.argv[:1]
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    if threads is not None:
        import torch
        torch.set_num_threads(threads)
    return args
