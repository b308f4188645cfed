"""Rebuilding a student from its own family: group widths -> the family's constructor arguments.

A family opts in with a method ``ptd_student_spec(widths) -> spec`` on its model class, taking
the student width of every Conv/Linear layer (by module name, as in the teacher) and returning
the ``ptd_spec`` (plain JSON) of the same family at those widths. The rebuilt model must have the
same layer names as the teacher; :func:`ptd.students.derive.derive_student` checks every width.
VGG (whose module predates this protocol) is adapted here.
"""
from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn

from ptd.models.vgg import VGG

SpecBuilder = Callable[[nn.Module, dict[str, int]], dict[str, Any]]


def vgg_student_spec(teacher: VGG, widths: dict[str, int]) -> dict[str, Any]:
    plan: list[int | str] = []
    in_channels = None
    for i, m in enumerate(teacher.features):
        if isinstance(m, nn.MaxPool2d):
            plan.append("M")
        elif isinstance(m, nn.Conv2d):
            if in_channels is None:
                in_channels = m.in_channels
            plan.append(int(widths[f"features.{i}"]))
    return {
        "arch": "vgg",
        "num_classes": teacher.classifier.out_features,
        "in_channels": int(in_channels),
        "width": 1.0,
        "plan": plan,
    }


def _stage1_projection(spec: dict[str, Any], widths: dict[str, int]) -> dict[str, Any]:
    """Stage 1 gets a 1x1 projection where the stem's width and its own differ (the published students' builder)."""
    proj = list(spec["projections"])
    proj[0] = bool(proj[0] or spec["stem_width"] != spec["stage_widths"][0])
    return {**spec, "projections": proj}


def stem_pin(model: nn.Module) -> tuple[str, list[str]] | None:
    """(stem layer, the layers that read it directly) for families whose stem keeps its width, else None.

    The paper's ResNet students keep the first conv at its width and decouple it from stage 1
    with a 1x1 projection in that stage's first block; ptd does the same for its ResNets (CIFAR,
    18..152) and WRNs. Other families (and channel surgery, which cannot add a projection) keep
    the stem in whatever group the teacher's adds put it.
    """
    from ptd.models.resnet import ResNet
    from ptd.models.wrn import WideResNet

    if type(model) is ResNet:
        first = model.layer1[0]
        readers = ["layer1.0.conv1"] + (["layer1.0.shortcut.0"] if first.shortcut is not None else [])
        return "conv1", readers
    if type(model) is WideResNet:
        first = model.block1[0]
        return "conv1", ["block1.0.conv1"] + (["block1.0.shortcut"] if first.shortcut is not None else [])
    return None


def spec_builder(model: nn.Module) -> SpecBuilder | None:
    """How to rebuild ``model``'s family at new widths, or None (then: channel surgery)."""
    if type(model) is VGG:
        return vgg_student_spec
    if stem_pin(model) is not None:
        return lambda teacher, widths: _stage1_projection(teacher.ptd_student_spec(widths), widths)
    fn = getattr(type(model), "ptd_student_spec", None)
    if callable(fn):
        return lambda teacher, widths: teacher.ptd_student_spec(widths)
    return None
