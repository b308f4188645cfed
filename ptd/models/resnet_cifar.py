"""CIFAR ResNets (He et al. 2016, section 4.2): resnet20/32/56/110.

A 3x3 conv to 16 channels, three stages of n = (depth - 2) / 6 basic blocks at 16/32/64 channels
(times ``width``; stride 2 entering stages 2 and 3), global average pool, Linear. Shape changes
go through a 1x1 conv + BN shortcut ("option B"). Accepts the same explicit-width arguments as
:mod:`ptd.models.resnet` (``stage_widths``, ``block_widths``, ``stem_width``, ``projections``),
which is how a derived student is rebuilt.
"""
from __future__ import annotations

from typing import Any

from ptd.models import MODELS
from ptd.models.resnet import BasicBlock, ResNet

DEPTHS = (20, 32, 56, 110)


def _make(depth: int):
    n = (depth - 2) // 6
    name = f"resnet{depth}"

    def build(num_classes: int, in_channels: int = 3, width: float = 1.0, **widths: Any) -> ResNet:
        unknown = set(widths) - {"stage_widths", "block_widths", "stem_width", "projections"}
        if unknown:
            raise TypeError(f"{name}: unknown argument(s) {sorted(unknown)}")
        return ResNet(BasicBlock, [n, n, n], [16, 32, 64], [1, 2, 2], num_classes, in_channels, width, "cifar",
                      spec_base={"arch": name}, **widths)

    build.__doc__ = f"{name} (CIFAR): 3 stages x {n} basic blocks, 16/32/64 channels, option-B shortcuts"
    return build


for _d in DEPTHS:
    MODELS.add(f"resnet{_d}", _make(_d))
