"""BiSeNet face parsing (Yu et al., 2018; the CelebAMask-HQ model facexlib publishes as
``parsing_bisenet.pth``), which PuLID uses to find the background of the aligned face.

Written from the published architecture with its parameter names, so that file loads as it is: a
ResNet-18 context path (features at 1/8, 1/16, 1/32), attention refinement of the 1/16 and 1/32
features plus a global context, a feature fusion with the 1/8 features, and 19 class logits
upsampled to the input size. ``labels`` gives the per-pixel class (PuLID's input: the 512 px aligned
face normalised with ImageNet's mean and standard deviation).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .tensor_files import file_name, read_tensors

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NUM_CLASSES = 19


class FaceParsingFileError(ValueError):
    """Not a BiSeNet face-parsing checkpoint."""


class ConvNormAct(nn.Module):
    """conv (no bias) -> batch norm -> ReLU; parameters ``conv`` and ``bn``."""

    def __init__(self, cin: int, cout: int, kernel: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, 1, kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if cin != cout or stride != 1 else None)

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class Backbone(nn.Module):
    """ResNet-18 without its head: (1/8, 1/16, 1/32) features."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths = ((64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2))
        for index, (cin, cout, stride) in enumerate(widths, start=1):
            setattr(self, f"layer{index}", nn.Sequential(ResidualBlock(cin, cout, stride), ResidualBlock(cout, cout, 1)))

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        f8 = self.layer2(self.layer1(x))
        f16 = self.layer3(f8)
        return f8, f16, self.layer4(f16)


def _global_gate(feat: torch.Tensor, *layers) -> torch.Tensor:
    gate = F.avg_pool2d(feat, feat.shape[2:])
    for layer in layers:
        gate = layer(gate)
    return gate


class Refinement(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = ConvNormAct(cin, cout)
        self.conv_atten = nn.Conv2d(cout, cout, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(cout)

    def forward(self, x):
        feat = self.conv(x)
        return feat * torch.sigmoid(_global_gate(feat, self.conv_atten, self.bn_atten))


class ContextPath(nn.Module):
    def __init__(self):
        super().__init__()
        self.resnet = Backbone()
        self.arm16 = Refinement(256, 128)
        self.arm32 = Refinement(512, 128)
        self.conv_head32 = ConvNormAct(128, 128)
        self.conv_head16 = ConvNormAct(128, 128)
        self.conv_avg = ConvNormAct(512, 128, kernel=1)

    def forward(self, x):
        f8, f16, f32 = self.resnet(x)
        context = self.conv_avg(F.avg_pool2d(f32, f32.shape[2:]))
        up32 = self.conv_head32(F.interpolate(self.arm32(f32) + context, f16.shape[2:], mode="nearest"))
        up16 = self.conv_head16(F.interpolate(self.arm16(f16) + up32, f8.shape[2:], mode="nearest"))
        return f8, up16, up32


class Fusion(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.convblk = ConvNormAct(cin, cout, kernel=1)
        self.conv1 = nn.Conv2d(cout, cout // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(cout // 4, cout, 1, bias=False)

    def forward(self, spatial, context):
        feat = self.convblk(torch.cat([spatial, context], dim=1))
        gate = torch.sigmoid(self.conv2(F.relu(self.conv1(F.avg_pool2d(feat, feat.shape[2:])))))
        return feat * gate + feat


class Head(nn.Module):
    def __init__(self, cin: int, mid: int, classes: int):
        super().__init__()
        self.conv = ConvNormAct(cin, mid)
        self.conv_out = nn.Conv2d(mid, classes, 1, bias=False)

    def forward(self, x):
        return self.conv_out(self.conv(x))


class BiSeNetParser(nn.Module):
    def __init__(self, classes: int = NUM_CLASSES):
        super().__init__()
        self.cp = ContextPath()
        self.ffm = Fusion(256, 256)
        self.conv_out = Head(256, 256, classes)
        self.conv_out16 = Head(128, 64, classes)    # auxiliary heads of training; kept so the file loads
        self.conv_out32 = Head(128, 64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised RGB (B, 3, H, W) -> class logits (B, classes, H, W) of the main head."""
        f8, c8, _ = self.cp(x)
        logits = self.conv_out(self.ffm(f8, c8))
        return F.interpolate(logits, x.shape[2:], mode="bilinear", align_corners=True)

    @torch.no_grad()
    def labels(self, images: torch.Tensor) -> torch.Tensor:
        """RGB (B, 3, H, W) in [0, 1] -> per-pixel class (B, 1, H, W)."""
        p = next(self.parameters())
        mean = torch.tensor(IMAGENET_MEAN, device=p.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=p.device).view(1, 3, 1, 1)
        x = ((images.to(p.device, torch.float32) - mean) / std).to(p.dtype)
        return self(x).argmax(dim=1, keepdim=True).to(images.device)


def load_state(state: dict, name: str = "face parsing") -> BiSeNetParser:
    model = BiSeNetParser(int(state["conv_out.conv_out.weight"].shape[0]) if "conv_out.conv_out.weight" in state
                          else NUM_CLASSES)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        raise FaceParsingFileError(f"'{name}' is not facexlib's BiSeNet face parsing model (parsing_bisenet.pth): "
                                   f"missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shapes {wrong[:3]}")
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


def load_file(path: str, name: Optional[str] = None) -> BiSeNetParser:
    """``parsing_bisenet.pth`` (read with ``weights_only=True``) or a safetensors copy."""
    name = file_name(path, name)
    state = read_tensors(path, name, FaceParsingFileError)
    return load_state(state, name)
