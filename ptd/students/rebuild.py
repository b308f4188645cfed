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


def spec_builder(model: nn.Module) -> SpecBuilder | None:
    """How to rebuild ``model``'s family at new widths, or None (then: channel surgery)."""
    if type(model) is VGG:
        return vgg_student_spec
    fn = getattr(type(model), "ptd_student_spec", None)
    if callable(fn):
        return lambda teacher, widths: teacher.ptd_student_spec(widths)
    return None
