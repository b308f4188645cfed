"""Hinton knowledge distillation, as in the paper:

    alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, y)

with the KL summed over classes and averaged over the batch ("batchmean"). The T^2 factor keeps
the soft term's gradient scale independent of T (Hinton et al., 2015). Returned as two named
terms, ``kd_soft`` (the weighted KL) and ``ce`` (the weighted cross-entropy); their sum is the loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ptd.distill.base import MAX_TEMPERATURE, DistillBatch, DistillLoss, register_loss


@register_loss("kd")
class KD(DistillLoss):
    distill_keys = ("alpha", "temperature")  # distill.alpha and distill.temperature are KD's

    @dataclass(frozen=True)
    class Options:
        alpha: float = 0.95  # weight of the soft (KL) term; (1 - alpha) weighs the label CE
        temperature: float = 10.0  # softmax temperature T (dimensionless)

        def __post_init__(self) -> None:
            if not 0.0 <= self.alpha <= 1.0:
                raise ValueError(f"alpha {self.alpha} is outside [0, 1]")
            if self.temperature <= 0:
                raise ValueError(f"temperature {self.temperature} must be > 0")
            if self.temperature > MAX_TEMPERATURE:
                raise ValueError(f"temperature {self.temperature} must be at most {MAX_TEMPERATURE:g}: beyond, float32 cannot "
                                 f"resolve softmax(logits / T) and the T^2-scaled KL is rounding noise")

    def forward(self, batch: DistillBatch) -> dict[str, torch.Tensor]:
        a, T = self.options.alpha, self.options.temperature
        # Softmax in float32: under bf16 autocast the KL of near-equal distributions underflows.
        s = F.log_softmax(batch.s_logits.float() / T, dim=1)
        # detach: the teacher is a fixed target; no gradient may reach it even if its logits carry one.
        t = F.log_softmax(batch.t_logits.detach().float() / T, dim=1)
        soft = F.kl_div(s, t, reduction="batchmean", log_target=True) * (T * T)
        hard = F.cross_entropy(batch.s_logits.float(), batch.y)
        return {"kd_soft": a * soft, "ce": (1.0 - a) * hard}
