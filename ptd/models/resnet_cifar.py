"""CIFAR ResNets (He et al. 2016, section 4.2): resnet20/32/56/110, and resnet8x4/32x4.

A 3x3 conv to 16 channels, three stages of n = (depth - 2) / 6 basic blocks at 16/32/64 channels
(times ``width``; stride 2 entering stages 2 and 3), global average pool, Linear. Shape changes
go through a 1x1 conv + BN shortcut ("option B"). Accepts the same explicit-width arguments as
:mod:`ptd.models.resnet` (``stage_widths``, ``block_widths``, ``stem_width``, ``projections``),
which is how a derived student is rebuilt.
"""
from __future__ import annotations

from typing import Any

from ptd.errors import counted
from ptd.models import MODELS
from ptd.models.resnet import BasicBlock, ResNet

DEPTHS = (20, 32, 56, 110)


def _make(depth: int):
    n = (depth - 2) // 6
    name = f"resnet{depth}"

    def build(num_classes: int, in_channels: int = 3, width: float = 1.0, **widths: Any) -> ResNet:
        unknown = set(widths) - {"stage_widths", "block_widths", "stem_width", "projections"}
        if unknown:
            raise TypeError(f"{name}: {counted(len(unknown), 'unknown argument')} {sorted(unknown)}")
        return ResNet(BasicBlock, [n, n, n], [16, 32, 64], [1, 2, 2], num_classes, in_channels, width, "cifar",
                      spec_base={"arch": name}, **widths)

    build.__doc__ = f"{name} (CIFAR): 3 stages x {n} basic blocks, 16/32/64 channels, option-B shortcuts"
    return build


for _d in DEPTHS:
    MODELS.add(f"resnet{_d}", _make(_d))


def _make_x4(depth: int):
    """The 4x-wide CIFAR ResNets of the CRD/RepDistiller benchmark ("resnet8x4", "resnet32x4").

    Their stem is 32 wide and the stages 64/128/256 (RepDistiller's num_filters [32, 64, 128, 256]),
    so stage 1's first block has a 1x1 projection (32 -> 64) as well.
    """
    n = (depth - 2) // 6
    name = f"resnet{depth}x4"

    def build(num_classes: int, in_channels: int = 3, width: float = 1.0, **widths: Any) -> ResNet:
        unknown = set(widths) - {"stage_widths", "block_widths", "stem_width", "projections"}
        if unknown:
            raise TypeError(f"{name}: {counted(len(unknown), 'unknown argument')} {sorted(unknown)}")
        widths.setdefault("stem_width", 32)
        return ResNet(BasicBlock, [n, n, n], [64, 128, 256], [1, 2, 2], num_classes, in_channels, width, "cifar",
                      spec_base={"arch": name}, **widths)

    build.__doc__ = f"{name} (CIFAR, CRD benchmark): 32-wide stem, 3 stages x {n} basic blocks, 64/128/256 channels"
    return build


for _d in (8, 32):
    MODELS.add(f"resnet{_d}x4", _make_x4(_d))
