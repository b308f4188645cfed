"""Plain cross-entropy on the labels: the scratch arm, and the teacher's own objective."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ptd.distill.base import DistillBatch, DistillLoss, register_loss


@register_loss("ce")
class CrossEntropy(DistillLoss):
    @dataclass(frozen=True)
    class Options:
        pass

    needs_teacher = False

    def forward(self, batch: DistillBatch) -> dict[str, torch.Tensor]:
        # No .float() here: under autocast F.cross_entropy already runs in float32, and the
        # scratch arm must compute exactly what the loop's default objective computes.
        return {"ce": F.cross_entropy(batch.s_logits, batch.y)}
