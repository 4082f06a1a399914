"""facexlib's ArcFace recogniser (IR-SE50, ``recognition_arcface_ir_se50.pth``), the embedding InfiniteYou's
image projection was trained on (pure torch).

The network as facexlib publishes it (``Backbone(num_layers=50, mode='ir_se')``, from TreB1eN's InsightFace
port): a 3x3 stem, 24 residual units with squeeze-excitation (3, 4, 14, 3 units of 64, 128, 256, 512
channels, the first of each stage striding 2), then BatchNorm, flatten, a linear layer to 512 and
BatchNorm1d; the output is L2-normalised. Parameter names are the published file's. Input: the face
aligned to ArcFace's 112 px five-point template, in the channel order the caller gives (InfiniteYou's
authors pass OpenCV's BGR), scaled to [-1, 1].
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn

from .tensor_files import file_name, read_tensors

STAGES = ((64, 64, 3), (64, 128, 4), (128, 256, 14), (256, 512, 3))   # in, out channels, units
SE_REDUCTION = 16
CROP = 112


class ArcFaceFileError(ValueError):
    """The file is not facexlib's IR-SE50 ArcFace; the message says what is wrong."""


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.mean(dim=(2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(w))))


class ResidualUnit(nn.Module):
    """``bottleneck_IR_SE``: BN, 3x3 conv, PReLU, strided 3x3 conv, BN, SE; the shortcut pools or projects."""

    def __init__(self, channels_in: int, channels_out: int, stride: int):
        super().__init__()
        self.stride = stride
        if channels_in == channels_out:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(channels_in, channels_out, 1, stride, bias=False),
                                                nn.BatchNorm2d(channels_out))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(channels_in), nn.Conv2d(channels_in, channels_out, 3, 1, 1, bias=False),
            nn.PReLU(channels_out), nn.Conv2d(channels_out, channels_out, 3, stride, 1, bias=False),
            nn.BatchNorm2d(channels_out), SqueezeExcite(channels_out, SE_REDUCTION))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class IRSE50(nn.Module):
    def __init__(self, stages=STAGES, embedding: int = 512):
        super().__init__()
        self.input_layer = nn.Sequential(nn.Conv2d(3, stages[0][0], 3, 1, 1, bias=False), nn.BatchNorm2d(stages[0][0]),
                                         nn.PReLU(stages[0][0]))
        units = []
        for channels_in, channels_out, count in stages:
            units.append(ResidualUnit(channels_in, channels_out, 2))
            units.extend(ResidualUnit(channels_out, channels_out, 1) for _ in range(count - 1))
        self.body = nn.Sequential(*units)
        last = stages[-1][1]
        self.output_layer = nn.Sequential(nn.BatchNorm2d(last), nn.Dropout(0.0), nn.Flatten(),
                                          nn.Linear(last * 7 * 7, embedding), nn.BatchNorm1d(embedding))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, 112, 112) in [-1, 1] -> (N, 512), L2-normalised."""
        out = self.output_layer(self.body(self.input_layer(x)))
        return out / out.norm(dim=1, keepdim=True)

    def models(self) -> list:
        return [self]


def load_state(state: dict, name: str = "recognition_arcface_ir_se50.pth") -> IRSE50:
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    with torch.device("meta"):
        model = IRSE50()
    expected = model.state_dict()
    for key in expected:            # files saved before PyTorch 0.4.1 have no BatchNorm step counters
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.tensor(0, dtype=torch.long)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        raise ArcFaceFileError(f"'{name}' is not facexlib's IR-SE50 ArcFace (recognition_arcface_ir_se50.pth): "
                               f"missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shapes {wrong[:3]}")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True,
                          assign=True)
    return model.eval().requires_grad_(False)


def load_file(path: str, name: Optional[str] = None) -> IRSE50:
    """The ``.pth`` read with ``torch.load(weights_only=True)`` (tensors only), or a safetensors copy."""
    name = file_name(path, name)
    state = read_tensors(path, name, ArcFaceFileError)
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ArcFaceFileError(f"'{name}' is not a state dict of tensors")
    return load_state(state, name)


def aligned_faces(photo: torch.Tensor, keypoints: list[np.ndarray]) -> torch.Tensor:
    """Faces of ``photo`` (H, W, 3) in [0, 1] aligned to ArcFace's 112 px template, in BGR scaled to [-1, 1]
    as InfiniteYou's authors feed the recogniser: (N, 3, 112, 112)."""
    from .face.alignment import ARCFACE_TEMPLATE_112, estimate_similarity, warp_crop
    crops = []
    for kps in keypoints:
        matrix = estimate_similarity(np.asarray(kps, dtype=np.float64), ARCFACE_TEMPLATE_112)
        crop = warp_crop(photo[..., :3].float(), matrix, CROP)         # (112, 112, 3) RGB
        crops.append(crop.flip(-1).permute(2, 0, 1))                   # BGR, as cv2 images are
    return torch.stack(crops) * 2.0 - 1.0
