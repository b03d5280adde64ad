"""ResNet in plain PyTorch with torchvision-compatible state_dict keys (torchvision is not installable here).

Pretrained weights load from torchvision's files, e.g.
https://download.pytorch.org/models/resnet50-11ad3fa6.pth (ImageNet, V2 recipe) or
https://download.pytorch.org/models/resnet18-f37072fd.pth; without them the architecture is built with
seeded random (Kaiming) weights, which is enough for speed work and plumbing but not for retrieval.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from models.errors import ExportError

_LOGGER = logging.getLogger(__name__)

# Blocks per stage, and whether each block is a 3-layer bottleneck (expansion 4) or a 2-layer basic block.
ARCHS: dict[str, tuple[tuple[int, int, int, int], bool]] = {
    "resnet18": ((2, 2, 2, 2), False),
    "resnet34": ((3, 4, 6, 3), False),
    "resnet50": ((3, 4, 6, 3), True),
    "resnet101": ((3, 4, 23, 3), True),
}


def build_resnet(arch: str, seed: int = 0) -> Any:
    """A torch.nn.Module ResNet whose state_dict keys match torchvision's; seeded random init."""
    import torch
    from torch import nn

    if arch not in ARCHS:
        raise ExportError(f"unknown ResNet {arch!r}; one of {sorted(ARCHS)}")
    layers, bottleneck = ARCHS[arch]
    expansion = 4 if bottleneck else 1

    class Block(nn.Module):
        def __init__(self, c_in: int, width: int, stride: int) -> None:
            super().__init__()
            c_out = width * expansion
            if bottleneck:
                self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
                self.bn1 = nn.BatchNorm2d(width)
                self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
                self.bn2 = nn.BatchNorm2d(width)
                self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
                self.bn3 = nn.BatchNorm2d(c_out)
            else:
                self.conv1 = nn.Conv2d(c_in, width, 3, stride, 1, bias=False)
                self.bn1 = nn.BatchNorm2d(width)
                self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
                self.bn2 = nn.BatchNorm2d(width)
            self.relu = nn.ReLU(inplace=True)
            self.downsample: nn.Module | None = None
            if stride != 1 or c_in != c_out:
                conv = nn.Conv2d(c_in, c_out, 1, stride, bias=False)
                self.downsample = nn.Sequential(conv, nn.BatchNorm2d(c_out))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            if bottleneck:
                out = self.bn3(self.conv3(self.relu(out)))
            return torch.relu(out + identity)

    class ResNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            c_in = 64
            stages = []
            for i, (blocks, width) in enumerate(zip(layers, (64, 128, 256, 512), strict=True)):
                stage = []
                for b in range(blocks):
                    stride = 2 if (b == 0 and i > 0) else 1
                    stage.append(Block(c_in, width, stride))
                    c_in = width * expansion
                stages.append(nn.Sequential(*stage))
            self.layer1, self.layer2, self.layer3, self.layer4 = stages
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(c_in, 1000)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            # Global mean over H, W kept as [N, C, 1, 1]: exports as ReduceMean, which the cut finds.
            x = x.mean(dim=(2, 3), keepdim=True)
            logits: torch.Tensor = self.fc(torch.flatten(x, 1))
            return logits

    torch.manual_seed(seed)
    model = ResNet()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model.eval()


def arch_from_state_dict(state: Mapping[str, Any]) -> str:
    """Tell resnet18/34/50/101 apart from the keys of a torchvision state_dict."""
    bottleneck = "layer1.0.conv3.weight" in state
    counts = []
    for stage in range(1, 5):
        idx = {int(k.split(".")[1]) for k in state if k.startswith(f"layer{stage}.")}
        counts.append(max(idx) + 1 if idx else 0)
    for name, (layers, is_bottleneck) in ARCHS.items():
        if tuple(counts) == layers and is_bottleneck == bottleneck:
            return name
    raise ExportError(f"state_dict is not a torchvision ResNet this tool knows (blocks per stage {counts})")


def load_state_dict(path: Path) -> dict[str, Any]:
    """Read a .pth/.pt state_dict (tensors only: weights_only=True, no pickled code runs)."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises pickle, zip and runtime errors alike
        raise ExportError(f"{path} is not a readable PyTorch state_dict: {exc}") from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise ExportError(f"{path} does not hold a state_dict")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def resnet_to_openvino(arch: str, weights: Path | None, seed: int = 0) -> tuple[Any, bool]:
    """(OpenVINO model with input [1,3,224,224] f32, pretrained) for a ResNet, random or from a .pth."""
    import openvino as ov
    import torch

    if weights is not None:
        state = load_state_dict(weights)
        found = arch_from_state_dict(state)
        if found != arch:
            raise ExportError(f"{weights.name} holds a {found}, not a {arch}")
        model = build_resnet(arch, seed)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatches
            raise ExportError(f"{weights.name} does not fit {arch}: {exc}") from exc
        # Older torchvision files predate BatchNorm's num_batches_tracked buffer; it is not a weight.
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise ExportError(f"{weights.name} misfits {arch}: missing {missing[:3]}, extra {unexpected[:3]}")
    else:
        model = build_resnet(arch, seed)
    with torch.no_grad():
        ov_model = ov.convert_model(model, example_input=torch.zeros(1, 3, 224, 224), input=[1, 3, 224, 224])
    return ov_model, weights is not None
