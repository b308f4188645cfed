"""Small helpers the distillation losses share: option checks, the CE term, float32 math.

Losses compute their formulas in float32 with autocast off: relation losses (SP's Gram matrix,
RKD's distances, CRD's exp(<u, v> / 0.07)) lose most of their digits in bfloat16 and are then
multiplied by weights up to 30000. FitNet's regressor (a conv as large as the student's
layers) still runs under the caller's autocast; CRD's small embeddings run in float32.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from ptd.distill.base import MAX_TEMPERATURE, DistillLoss, LossSetup
from ptd.errors import counted


def check(ok: bool, loss: str, field: str, value: Any, rule: str) -> None:
    """One-line error naming the option, its value and what it must be."""
    if not ok:
        raise ValueError(f"distill.options.{loss}.{field} = {value!r}: {rule}")


def check_temperature(loss: str, value: float) -> None:
    """A softmax temperature in (0, MAX_TEMPERATURE] (ptd.config: past it float32 cannot resolve
    softmax(logits / T))."""
    check(value > 0, loss, "temperature", value, "must be > 0")
    check(value <= MAX_TEMPERATURE, loss, "temperature", value,
          f"must be at most {MAX_TEMPERATURE:g}: beyond, float32 cannot resolve softmax(logits / T)")


@contextlib.contextmanager
def float32(device: torch.device) -> Iterator[None]:
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def cross_entropy(logits: torch.Tensor, y: torch.Tensor, weight: float) -> torch.Tensor:
    return weight * F.cross_entropy(logits.float(), y)


def flat(x: torch.Tensor) -> torch.Tensor:
    """[B, ...] -> [B, D] in float32."""
    return x.float().reshape(x.shape[0], -1)


def shape_error(loss: str, layer_t: str, shape_t: tuple, layer_s: str, shape_s: tuple, why: str) -> ValueError:
    return ValueError(
        f"{loss}: teacher layer {layer_t!r} {tuple(shape_t)} and student layer {layer_s!r} {tuple(shape_s)}: {why}"
    )


def layer_shape(loss: str, side: str, shapes: dict[str, tuple[int, ...]], name: str) -> tuple[int, ...]:
    if name not in shapes:
        raise ValueError(f"{loss}: no probed shape for {side} layer {name!r} (probed: {', '.join(sorted(shapes)) or 'none'})")
    return tuple(shapes[name])


class OneLayerLoss(DistillLoss):
    """A loss that reads one teacher layer and one student layer, named by its Options'
    ``teacher_layer`` and ``student_layer`` (empty: the teacher's name, which derived students
    keep). Sets ``t_name``/``s_name`` and the probed per-sample ``t_shape``/``s_shape``."""

    @classmethod
    def feature_layers(cls, options: Any) -> tuple[list[str], list[str]]:
        return [options.teacher_layer], [options.student_layer or options.teacher_layer]

    def __init__(self, options: Any, setup: LossSetup):
        super().__init__(options, setup)
        (self.t_name,), (self.s_name,) = self.feature_layers(options)
        self.t_shape = layer_shape(self.loss_name, "teacher", setup.teacher_shapes, self.t_name)
        self.s_shape = layer_shape(self.loss_name, "student", setup.student_shapes, self.s_name)


def check_layer_lists(loss: str, teacher_layers: tuple[str, ...], student_layers: tuple[str, ...]) -> None:
    """Options of a loss that reads pairs of layers: at least one, and one student layer per teacher layer."""
    check(len(teacher_layers) > 0, loss, "teacher_layers", list(teacher_layers), "needs at least one layer")
    check(len(student_layers) in (0, len(teacher_layers)), loss, "student_layers", list(student_layers),
          f"must be empty or list {counted(len(teacher_layers), 'layer')}, one per teacher layer")


class LayerPairsLoss(DistillLoss):
    """A loss that reads pairs of layers, named by its Options' ``teacher_layers`` and
    ``student_layers`` (empty: the teacher's names). Sets ``pairs`` [(teacher, student)] and the
    probed per-sample ``shapes`` [(teacher shape, student shape)] in the same order."""

    @classmethod
    def feature_layers(cls, options: Any) -> tuple[list[str], list[str]]:
        return list(options.teacher_layers), list(options.student_layers or options.teacher_layers)

    def __init__(self, options: Any, setup: LossSetup):
        super().__init__(options, setup)
        self.pairs = list(zip(*self.feature_layers(options)))
        self.shapes = [(layer_shape(self.loss_name, "teacher", setup.teacher_shapes, t),
                        layer_shape(self.loss_name, "student", setup.student_shapes, s)) for t, s in self.pairs]
