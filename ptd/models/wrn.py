"""Wide ResNets (Zagoruyko & Komodakis 2016): WRN-d-k for small images.

A 3x3 conv to 16 channels, three stages of n = (d - 4) / 6 pre-activation basic blocks
(BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3) at 16k/32k/64k channels (stride 2 entering stages 2
and 3), then BN-ReLU, global average pool, Linear. A block whose width or stride changes gets a
1x1 conv shortcut, applied to the pre-activated input as in the reference code.

Registered as ``wrn16_1 .. wrn40_4`` and ``wrn28_10``, plus ``wrn`` taking ``depth`` and
``widen``. Explicit widths for rebuilding a student: ``stage_widths`` (the residual stream per
stage), ``block_widths`` (per stage, per block: the first conv's width), ``stem_width`` and
``projections`` (per stage: does its first block have a conv shortcut), all multiplied by
``width`` like the defaults.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ptd.errors import counted
from ptd.models import MODELS


def _scale(c: int, width: float) -> int:
    return max(1, int(round(int(c) * width)))


class PreActBlock(nn.Module):
    def __init__(self, cin: int, inner: int, cout: int, stride: int, projection: bool, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, inner, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, cout, 3, padding=1, bias=False)
        self.dropout = dropout
        self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False) if projection else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        out = self.conv1(o)
        out = F.relu(self.bn2(out))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        return out + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    """Modules: ``conv1`` (stem), ``block1``..``block3`` (stages), ``bn`` (final), ``fc``."""

    def __init__(
        self,
        depth: int,
        widen: int,
        num_classes: int,
        in_channels: int = 3,
        width: float = 1.0,
        dropout: float = 0.0,
        stage_widths: Sequence[int] | None = None,
        block_widths: Sequence[Sequence[int]] | None = None,
        stem_width: int | None = None,
        projections: Sequence[bool] | None = None,
        spec_base: dict[str, Any] | None = None,
    ):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n + 4 with n >= 1, got {depth}")
        if widen < 1:
            raise ValueError(f"WRN widen factor must be >= 1, got {widen}")
        n = (depth - 4) // 6
        base = [16 * widen, 32 * widen, 64 * widen]
        stage_w = [_scale(c, width) for c in (stage_widths if stage_widths is not None else base)]
        if len(stage_w) != 3:
            raise ValueError("stage_widths needs 3 entries")
        if block_widths is None:
            block_widths = [[c] * n for c in base]
        if len(block_widths) != 3 or any(len(b) != n for b in block_widths):
            raise ValueError(f"block_widths needs 3 stages of {n} blocks")
        inner_w = [[_scale(c, width) for c in b] for b in block_widths]
        stem_w = _scale(16 if stem_width is None else stem_width, width)
        if projections is not None and len(projections) != 3:
            raise ValueError("projections needs 3 entries")
        self.spec_base = dict(spec_base or {})
        self.conv1 = nn.Conv2d(in_channels, stem_w, 3, padding=1, bias=False)
        cin = stem_w
        strides = [1, 2, 2]
        for s in range(3):
            proj = bool(projections[s]) if projections is not None else (strides[s] != 1 or cin != stage_w[s])
            blocks = []
            for i in range(n):
                first = i == 0
                blocks.append(PreActBlock(cin, inner_w[s][i], stage_w[s], strides[s] if first else 1, proj if first else False, dropout))
                cin = stage_w[s]
            self.add_module(f"block{s + 1}", nn.Sequential(*blocks))
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def stages(self) -> list[nn.Sequential]:
        return [self.block1, self.block2, self.block3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for stage in self.stages():
            x = stage(x)
        x = F.relu(self.bn(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def ptd_student_spec(self, widths: dict[str, int]) -> dict[str, Any]:
        stages = self.stages()
        return {
            **self.spec_base,
            "num_classes": self.fc.out_features,
            "in_channels": self.conv1.in_channels,
            "width": 1.0,
            "stage_widths": [int(widths[f"block{s + 1}.0.conv2"]) for s in range(3)],
            "block_widths": [[int(widths[f"block{s + 1}.{i}.conv1"]) for i in range(len(st))] for s, st in enumerate(stages)],
            "stem_width": int(widths["conv1"]),
            "projections": [st[0].shortcut is not None for st in stages],
        }


_WIDTH_KWARGS = {"stage_widths", "block_widths", "stem_width", "projections"}


@MODELS.register("wrn")
def wrn(num_classes: int, in_channels: int = 3, width: float = 1.0, depth: int = 16, widen: int = 4, dropout: float = 0.0, **widths: Any) -> WideResNet:
    """WRN-depth-widen (depth = 6n + 4)."""
    unknown = set(widths) - _WIDTH_KWARGS
    if unknown:
        raise TypeError(f"wrn: {counted(len(unknown), 'unknown argument')} {sorted(unknown)}")
    return WideResNet(depth, widen, num_classes, in_channels, width, dropout,
                      spec_base={"arch": "wrn", "depth": depth, "widen": widen, "dropout": dropout}, **widths)


def _make(depth: int, widen: int):
    name = f"wrn{depth}_{widen}"

    def build(num_classes: int, in_channels: int = 3, width: float = 1.0, dropout: float = 0.0, **widths: Any) -> WideResNet:
        unknown = set(widths) - _WIDTH_KWARGS
        if unknown:
            raise TypeError(f"{name}: {counted(len(unknown), 'unknown argument')} {sorted(unknown)}")
        return WideResNet(depth, widen, num_classes, in_channels, width, dropout,
                          spec_base={"arch": name, "dropout": dropout}, **widths)

    build.__doc__ = f"WRN-{depth}-{widen}"
    return build


for _d, _k in [(16, 1), (16, 2), (16, 4), (16, 8), (28, 10), (40, 1), (40, 2), (40, 4)]:
    MODELS.add(f"wrn{_d}_{_k}", _make(_d, _k))
