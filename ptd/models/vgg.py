"""CIFAR-style VGG with batch norm, as in the paper's code (vgg8/vgg13: as in RepDistiller).

Each entry of a plan is a 3x3 conv (padding 1, with bias) + BatchNorm + ReLU, or 'M' for a 2x2
max-pool. Pools use ceil_mode so a 28x28 input (Fashion-MNIST) still has a 1x1 map after five
pools; on 32x32 inputs ceil_mode changes nothing. A global average pool feeds one Linear layer.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn as nn

from ptd.models import MODELS

PlanItem = Union[int, str]

PLANS: dict[str, list[PlanItem]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    # vgg8 and vgg13: the CRD/RepDistiller distillation benchmark's CIFAR nets, five conv blocks
    # of which only the first three end in a pool on 32x32 inputs (its fourth pool runs only on
    # 64x64), so their last maps are 4x4: what the published student accuracies were measured on.
    "vgg8": [64, "M", 128, "M", 256, "M", 512, 512],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, 512, 512],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512],
}


def scale_plan(plan: Sequence[PlanItem], width: float) -> list[PlanItem]:
    """Multiply every conv width by ``width`` (at least one channel)."""
    return [p if p == "M" else max(1, int(round(int(p) * width))) for p in plan]


def validate_plan(plan: Sequence[PlanItem]) -> list[PlanItem]:
    out: list[PlanItem] = []
    for p in plan:
        if p == "M":
            out.append("M")
        elif isinstance(p, int) and not isinstance(p, bool) and p > 0:
            out.append(p)
        else:
            raise ValueError(f"bad VGG plan entry {p!r}: each entry is a positive channel count or 'M'")
    if not any(p != "M" for p in out):
        raise ValueError("a VGG plan needs at least one conv layer")
    return out


class VGG(nn.Module):
    def __init__(self, plan: Sequence[PlanItem], num_classes: int, in_channels: int = 3):
        super().__init__()
        self.plan = validate_plan(plan)
        layers: list[nn.Module] = []
        c = in_channels
        for p in self.plan:
            if p == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                layers += [nn.Conv2d(c, p, 3, padding=1), nn.BatchNorm2d(p), nn.ReLU(inplace=True)]
                c = p
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def _make(name: str):
    def build(num_classes: int, in_channels: int = 3, width: float = 1.0) -> VGG:
        return VGG(scale_plan(PLANS[name], width), num_classes, in_channels)

    build.__doc__ = f"{name} (CIFAR-style, batch norm): plan {PLANS[name]}"
    return build


for _name in PLANS:
    MODELS.add(_name, _make(_name))


@MODELS.register("vgg")
def vgg_custom(num_classes: int, in_channels: int = 3, width: float = 1.0, plan: Sequence[PlanItem] = ()) -> VGG:
    """A VGG from an explicit plan, e.g. a student derived from a pruned teacher."""
    return VGG(scale_plan(validate_plan(plan), width), num_classes, in_channels)
