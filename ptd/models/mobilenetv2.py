"""MobileNetV2 (Sandler et al. 2018) for small images.

The ImageNet network with the two changes usual for 32x32 inputs: the stem conv has stride 1 and
the second stage (24 channels) stride 1, so a 32x32 image reaches the last stage at 4x4 instead
of 1x1. ``width`` is the width multiplier (channels rounded to multiples of 8, as in the paper;
the last conv stays 1280 for width <= 1).

Each inverted-residual block: ``expand`` (1x1 conv-BN-ReLU6; absent where the expansion factor is
1), ``dw`` (3x3 depthwise conv-BN-ReLU6), ``project`` (1x1 conv) + ``bn``. A block has the
residual add iff it is not the first block of its stage (in the reference network that is
exactly stride 1 with equal in/out widths), so a student keeps its teacher's topology whatever
its widths.

Explicit widths for rebuilding a student (plain JSON, used as given -- not rounded to 8 and not
multiplied by ``width``): ``stem_width``, ``stage_widths`` (7 output widths),
``block_widths`` (per stage, per block: the hidden width of the expand + depthwise convs; for
expansion-1 blocks it must equal the block's input width) and ``last_width``.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn

from ptd.errors import counted
from ptd.models import MODELS

# (expansion t, output channels c, blocks n, stride of the first block s); stage 2's stride is 1
# here (2 on ImageNet).
CONFIG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def make_divisible(v: float, divisor: int = 8) -> int:
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new < 0.9 * v:
        new += divisor
    return new


def conv_bn_relu6(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, hidden: int, cout: int, stride: int, expand: bool, residual: bool):
        super().__init__()
        if not expand and hidden != cin:
            raise ValueError(f"an expansion-1 block's hidden width is its input width ({cin}), got {hidden}")
        self.expand = conv_bn_relu6(cin, hidden, 1) if expand else None
        self.dw = conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden)
        self.project = nn.Conv2d(hidden, cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.residual = residual
        if residual and (stride != 1 or cin != cout):
            raise ValueError(f"a residual block needs stride 1 and equal widths, got stride {stride}, {cin} -> {cout}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x if self.expand is None else self.expand(x)
        out = self.bn(self.project(self.dw(out)))
        return x + out if self.residual else out


class MobileNetV2(nn.Module):
    """Modules: ``features.0`` (stem), ``features.1..17`` (blocks), ``features.18`` (last 1x1 conv), ``classifier``."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        width: float = 1.0,
        dropout: float = 0.2,
        stem_width: int | None = None,
        stage_widths: Sequence[int] | None = None,
        block_widths: Sequence[Sequence[int]] | None = None,
        last_width: int | None = None,
        spec_base: dict[str, Any] | None = None,
    ):
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be > 0, got {width}")
        stem_w = int(stem_width) if stem_width is not None else make_divisible(32 * width)
        stage_w = [int(c) for c in stage_widths] if stage_widths is not None else [make_divisible(c * width) for _, c, _, _ in CONFIG]
        if len(stage_w) != len(CONFIG):
            raise ValueError(f"stage_widths needs {len(CONFIG)} entries")
        last_w = int(last_width) if last_width is not None else (make_divisible(1280 * width) if width > 1.0 else 1280)
        if block_widths is not None and (len(block_widths) != len(CONFIG) or any(len(b) != n for b, (_, _, n, _) in zip(block_widths, CONFIG))):
            raise ValueError(f"block_widths needs {[n for _, _, n, _ in CONFIG]} blocks per stage")
        self.spec_base = dict(spec_base or {})
        layers: list[nn.Module] = [conv_bn_relu6(in_channels, stem_w, 3, 1)]
        cin = stem_w
        for s, (t, _, n, stride) in enumerate(CONFIG):
            for i in range(n):
                hidden = int(block_widths[s][i]) if block_widths is not None else (cin * t if t != 1 else cin)
                layers.append(InvertedResidual(cin, hidden, stage_w[s], stride if i == 0 else 1, t != 1, residual=i > 0))
                cin = stage_w[s]
        layers.append(conv_bn_relu6(cin, last_w, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last_w, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))

    def ptd_student_spec(self, widths: dict[str, int]) -> dict[str, Any]:
        stage_widths, block_widths = [], []
        idx = 1
        for _, _, n, _ in CONFIG:
            stage_widths.append(int(widths[f"features.{idx}.project"]))
            block_widths.append([int(widths[f"features.{idx + i}.dw.0"]) for i in range(n)])
            idx += n
        return {
            **self.spec_base,
            "num_classes": self.classifier[1].out_features,
            "in_channels": self.features[0][0].in_channels,
            "width": 1.0,
            "stem_width": int(widths["features.0.0"]),
            "stage_widths": stage_widths,
            "block_widths": block_widths,
            "last_width": int(widths[f"features.{idx}.0"]),
        }


@MODELS.register("mobilenetv2")
def mobilenetv2(num_classes: int, in_channels: int = 3, width: float = 1.0, dropout: float = 0.2, **widths: Any) -> MobileNetV2:
    """MobileNetV2 for 32x32-ish inputs (stem and stage-2 stride 1), width multiplier ``width``."""
    unknown = set(widths) - {"stem_width", "stage_widths", "block_widths", "last_width"}
    if unknown:
        raise TypeError(f"mobilenetv2: {counted(len(unknown), 'unknown argument')} {sorted(unknown)}")
    return MobileNetV2(num_classes, in_channels, width, dropout, spec_base={"arch": "mobilenetv2", "dropout": dropout}, **widths)
