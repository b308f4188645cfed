"""Hinton knowledge distillation, as in the paper:

    alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, y)

with the KL summed over classes and averaged over the batch ("batchmean"). The T^2 factor keeps
the soft term's gradient scale independent of T (Hinton et al., 2015).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ptd.distill import LOSSES


@LOSSES.register("kd")
class KDLoss(nn.Module):
    def __init__(self, alpha: float = 0.95, temperature: float = 10.0):
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"kd alpha {alpha} is outside [0, 1]")
        if temperature <= 0:
            raise ValueError(f"kd temperature {temperature} must be > 0")
        self.alpha, self.temperature = alpha, temperature

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, features=None) -> torch.Tensor:
        T = self.temperature
        # Softmax in float32: under bf16 autocast the KL of near-equal distributions underflows.
        s = F.log_softmax(student_logits.float() / T, dim=1)
        t = F.log_softmax(teacher_logits.float() / T, dim=1)
        soft = F.kl_div(s, t, reduction="batchmean", log_target=True) * (T * T)
        hard = F.cross_entropy(student_logits.float(), targets)
        return self.alpha * soft + (1.0 - self.alpha) * hard
