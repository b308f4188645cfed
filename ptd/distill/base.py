"""The distillation seam: what a loss is, what it is built from, what it sees each step.

A loss is one file holding one ``DistillLoss`` subclass, registered by name with
``@register_loss("name")``, that owns a frozen ``Options`` dataclass (defaults from its paper).
The ``Distiller`` (ptd.distill.distiller) owns the student and one loss module, so their
parameters train, sync under DDP, checkpoint and resume together; the teacher stays outside it,
frozen, in eval mode.

Life of a loss:
1. ``Options`` is built from the config section ``distill.options.<name>`` (unknown keys rejected).
2. ``cls.feature_layers(options)`` names the layers it reads: ``(teacher_names, student_names)``,
   module names as in ``model.named_modules()``, or ``PENULTIMATE`` (the input of the classifier,
   i.e. the pooled embedding). Derived students keep the teacher's module names, so by default a
   loss uses the same names on both sides.
3. A probe pass (one batch, no gradients) records each named feature's per-sample shape, and the
   loss is built as ``cls(options, setup)`` with a ``LossSetup``: it sizes its own trainable
   modules (regressors, embeddings, memory banks) from those shapes.
4. Each step it is called with a ``DistillBatch`` and returns named terms, each already weighted;
   the training objective is their sum, and every term is logged per epoch.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ptd.config import MAX_TEMPERATURE  # noqa: F401  (the losses import it from here)
from ptd.registry import Registry

# A pseudo layer name: the input of the model's last nn.Linear (the pooled feature / embedding
# that CRD, RKD, PKT read). Hooked with a forward pre-hook on that Linear.
PENULTIMATE = "@penultimate"


@dataclass(frozen=True)
class LossSetup:
    """What a loss may size itself from; filled by the probe pass before training starts."""

    num_classes: int
    num_samples: int  # training-set size: CRD's memory bank has one slot per sample
    teacher_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # layer -> per-sample shape
    student_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    epochs: int = 1  # length of the distillation schedule (DKD's warm-up is in epochs)
    batch_size: int | None = None  # training batch, where known: losses whose step memory grows with it check it
    # int64 [num_samples]: the training labels by sample index, when known before training (the
    # pipeline knows them); CRD's exact negatives then skip the anchor's class from the first step.
    labels: Any = None


@dataclass
class DistillBatch:
    """One step's view. Features are float32 (cast from autocast outputs by the distiller)."""

    y: torch.Tensor  # int64 [B] labels
    index: torch.Tensor  # int64 [B] positions of the samples in the training split (CRD)
    epoch: int  # 0-based current epoch
    s_logits: torch.Tensor
    t_logits: torch.Tensor | None  # None for plain cross-entropy (the scratch arm)
    s_feats: dict[str, torch.Tensor] = field(default_factory=dict)
    t_feats: dict[str, torch.Tensor] = field(default_factory=dict)


class DistillLoss(nn.Module):
    """Base class; subclasses set ``Options`` and implement ``forward``."""

    @dataclass(frozen=True)
    class Options:
        pass

    needs_teacher: ClassVar[bool] = True
    # Why the loss cannot train under DDP (torchrun, world size > 1), or "" when it can. A loss that
    # keeps per-sample state across steps (a memory bank indexed by the sample) sees only its rank's
    # samples, and DDP's buffer broadcast replaces the other ranks' updates with rank 0's every step.
    single_process_only: ClassVar[str] = ""
    # The distill-section keys (distill.alpha, distill.temperature: the paper's KD settings) this
    # loss takes as the defaults of its options of the same name. Only KD's: DKD's alpha and
    # temperature (1, 4) or DIST's temperature (1) are other quantities that share a name, and
    # took KD's 0.95 and 10 while every loss read them.
    distill_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: Any, setup: LossSetup):
        super().__init__()
        self.options = options
        self.setup = setup

    @classmethod
    def feature_layers(cls, options: Any) -> tuple[list[str], list[str]]:
        """(teacher layer names, student layer names) this loss reads; logits-only losses: none."""
        return [], []

    def forward(self, batch: DistillBatch) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


LOSSES: Registry[type[DistillLoss]] = Registry("distillation loss")


def register_loss(name: str):
    def deco(cls: type[DistillLoss]) -> type[DistillLoss]:
        if not (dataclasses.is_dataclass(cls.Options) and cls.Options.__dataclass_params__.frozen):
            raise TypeError(f"distillation loss {name!r}: Options must be a frozen dataclass")
        cls.loss_name = name
        return LOSSES.register(name)(cls)

    return deco
