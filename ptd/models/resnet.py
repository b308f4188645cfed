"""ResNet-18/34/50/101/152 with a choice of stem, written to be rebuilt at any per-layer width.

``stem="cifar"`` (default): 3x3 stride-1 conv, no max-pool -- the paper's Tiny-ImageNet variant
and the usual CIFAR one. ``stem="imagenet"``: 7x7 stride-2 conv + 3x3 stride-2 max-pool.

Widths, all optional and plain JSON (a derived student is described by them):

* ``stage_widths``: the residual stream's width in each stage (a stage's block outputs, joined by
  residual adds, share it). Default 64/128/256/512 (x4 for bottleneck nets), times ``width``.
* ``block_widths``: per stage, per block, the inner width(s): an int for a basic block (its first
  conv), a pair ``[conv1, conv2]`` for a bottleneck. Default: the stage's base width.
* ``stem_width``: the first conv's width. Default: the first stage's width for basic blocks,
  64 x ``width`` for bottlenecks.
* ``projections``: per stage, whether its first block has a 1x1 conv (+BN) shortcut. Default:
  where the stride or the width changes (torchvision's rule, "option B"). A student keeps its
  teacher's choice even where its own widths would make the other choice.

Explicit widths are multiplied by ``width`` like the defaults; a derived student uses width 1.0.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn

from ptd.errors import counted
from ptd.models import MODELS

BlockWidth = int | Sequence[int]


def _scale(c: int, width: float) -> int:
    return max(1, int(round(int(c) * width)))


def _bn_conv(cin: int, cout: int, k: int, stride: int = 1) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False), nn.BatchNorm2d(cout)


class BasicBlock(nn.Module):
    n_inner = 1

    def __init__(self, cin: int, inner: Sequence[int], cout: int, stride: int, projection: bool):
        super().__init__()
        self.conv1, self.bn1 = _bn_conv(cin, inner[0], 3, stride)
        self.conv2, self.bn2 = _bn_conv(inner[0], cout, 3)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential(*_bn_conv(cin, cout, 1, stride)) if projection else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class Bottleneck(nn.Module):
    n_inner = 2
    expansion = 4

    def __init__(self, cin: int, inner: Sequence[int], cout: int, stride: int, projection: bool):
        super().__init__()
        self.conv1, self.bn1 = _bn_conv(cin, inner[0], 1)
        self.conv2, self.bn2 = _bn_conv(inner[0], inner[1], 3, stride)  # stride on the 3x3, as torchvision
        self.conv3, self.bn3 = _bn_conv(inner[1], cout, 1)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential(*_bn_conv(cin, cout, 1, stride)) if projection else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.shortcut is None else self.shortcut(x)))


def _inner(spec: BlockWidth, n: int, where: str) -> list[int]:
    vals = [spec] if isinstance(spec, int) else list(spec)
    if len(vals) == 1 and n > 1:
        vals = vals * n
    if len(vals) != n or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in vals):
        raise ValueError(f"{where}: inner width must be {counted(n, 'positive int')}, got {spec!r}")
    return vals


class ResNet(nn.Module):
    """Stem -> stages of residual blocks -> global average pool -> Linear.

    Modules: ``conv1``/``bn1`` (stem), ``layer1``..``layerN`` (stages, each a Sequential of
    blocks with ``conv1``.. and an optional ``shortcut``), ``fc``.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        depths: Sequence[int],
        base_widths: Sequence[int],
        strides: Sequence[int],
        num_classes: int,
        in_channels: int = 3,
        width: float = 1.0,
        stem: str = "cifar",
        stage_widths: Sequence[int] | None = None,
        block_widths: Sequence[Sequence[BlockWidth]] | None = None,
        stem_width: int | None = None,
        projections: Sequence[bool] | None = None,
        spec_base: dict[str, Any] | None = None,
    ):
        super().__init__()
        n_stages = len(depths)
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        expansion = getattr(block, "expansion", 1)
        if stage_widths is None:
            stage_widths = [b * expansion for b in base_widths]
        if len(stage_widths) != n_stages:
            raise ValueError(f"stage_widths needs {n_stages} entries, got {len(stage_widths)}")
        stage_w = [_scale(c, width) for c in stage_widths]
        if block_widths is None:
            block_widths = [[b] * d for b, d in zip(base_widths, depths)]
        if len(block_widths) != n_stages or any(len(bw) != d for bw, d in zip(block_widths, depths)):
            raise ValueError(f"block_widths needs {list(depths)} blocks per stage")
        inner_w = [
            [[_scale(v, width) for v in _inner(b, block.n_inner, f"block_widths[{s}][{i}]")] for i, b in enumerate(bw)]
            for s, bw in enumerate(block_widths)
        ]
        if stem_width is None:  # basic blocks: the stem feeds stage 1 through identity adds; bottlenecks: 64
            stem_w = stage_w[0] if expansion == 1 else _scale(base_widths[0], width)
        else:
            stem_w = _scale(stem_width, width)
        if projections is not None and len(projections) != n_stages:
            raise ValueError(f"projections needs {n_stages} entries")

        self.block_type = block.__name__
        self.stem = stem
        self.spec_base = dict(spec_base or {})
        self.n_stages = n_stages
        if stem == "cifar":
            self.conv1, self.bn1 = _bn_conv(in_channels, stem_w, 3)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, stem_w, 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(stem_w)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.relu = nn.ReLU(inplace=True)
        cin = stem_w
        for s in range(n_stages):
            proj = bool(projections[s]) if projections is not None else (strides[s] != 1 or cin != stage_w[s])
            blocks = []
            for i in range(depths[s]):
                first = i == 0
                blocks.append(block(cin, inner_w[s][i], stage_w[s], strides[s] if first else 1, proj if first else False))
                cin = stage_w[s]
            self.add_module(f"layer{s + 1}", nn.Sequential(*blocks))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, f"layer{s + 1}") for s in range(self.n_stages)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in self.stages():
            x = stage(x)
        return self.fc(torch.flatten(self.pool(x), 1))

    def ptd_student_spec(self, widths: dict[str, int]) -> dict[str, Any]:
        """This family at the given per-layer widths (module name -> out channels)."""
        stage_widths, block_widths, projections = [], [], []
        bottleneck = self.block_type == "Bottleneck"
        for s, stage in enumerate(self.stages()):
            pre = f"layer{s + 1}"
            last = "conv3" if bottleneck else "conv2"
            stage_widths.append(int(widths[f"{pre}.0.{last}"]))
            if bottleneck:
                block_widths.append([[int(widths[f"{pre}.{i}.conv1"]), int(widths[f"{pre}.{i}.conv2"])] for i in range(len(stage))])
            else:
                block_widths.append([int(widths[f"{pre}.{i}.conv1"]) for i in range(len(stage))])
            projections.append(stage[0].shortcut is not None)
        return {
            **self.spec_base,
            "num_classes": self.fc.out_features,
            "in_channels": self.conv1.in_channels,
            "width": 1.0,
            "stage_widths": stage_widths,
            "block_widths": block_widths,
            "stem_width": int(widths["conv1"]),
            "projections": projections,
        }


IMAGENET_RESNETS: dict[str, tuple[type, list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet101": (Bottleneck, [3, 4, 23, 3]),
    "resnet152": (Bottleneck, [3, 8, 36, 3]),
}


def _make(name: str):
    block, depths = IMAGENET_RESNETS[name]

    def build(num_classes: int, in_channels: int = 3, width: float = 1.0, stem: str = "cifar", **widths: Any) -> ResNet:
        unknown = set(widths) - {"stage_widths", "block_widths", "stem_width", "projections"}
        if unknown:
            raise TypeError(f"{name}: {counted(len(unknown), 'unknown argument')} {sorted(unknown)}")
        return ResNet(block, depths, [64, 128, 256, 512], [1, 2, 2, 2], num_classes, in_channels, width, stem,
                      spec_base={"arch": name, "stem": stem}, **widths)

    build.__doc__ = f"{name}: {block.__name__} x {depths}; stem='cifar' (3x3, no max-pool) or 'imagenet'"
    return build


for _name in IMAGENET_RESNETS:
    MODELS.add(_name, _make(_name))
