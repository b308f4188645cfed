"""Decoupled knowledge distillation (Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022).

KD's KL split in two: with p = softmax(z / T), target class g,

    TCKD = T^2 * KL([p_t[g], 1 - p_t[g]] || [p_s[g], 1 - p_s[g]])        (binary: target vs rest)
    NCKD = T^2 * KL(softmax(z_t / T)[not g] || softmax(z_s / T)[not g])   (among the other classes)
    loss = ce_weight * CE(z_s, y) + w(epoch) * (alpha * TCKD + beta * NCKD)

both KLs summed over classes and averaged over the batch. w ramps linearly to 1 over the first
``warmup_epochs`` epochs, as the reference code does (min(epoch / warmup, 1) with 1-based epochs,
here min((epoch + 1) / warmup, 1) with ptd's 0-based epoch).
Defaults: the paper's CIFAR-100 settings and mdistiller's DKD config: CE 1.0, alpha 1.0, beta 8.0
(mdistiller uses 8 for resnet32x4->resnet8x4, 6 for vgg13->vgg8 and wrn_40_2->wrn_16_2), T 4,
warm-up 20 epochs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ptd.config import MAX_EPOCHS
from ptd.distill._common import check, check_temperature, cross_entropy, float32
from ptd.distill.base import DistillBatch, DistillLoss, register_loss


@register_loss("dkd")
class DKDLoss(DistillLoss):
    @dataclass(frozen=True)
    class Options:
        ce_weight: float = 1.0
        alpha: float = 1.0  # TCKD weight
        beta: float = 8.0  # NCKD weight
        temperature: float = 4.0
        warmup_epochs: int = 20  # epochs over which the DKD term ramps linearly from 1/warmup to 1

        def __post_init__(self) -> None:
            check(self.ce_weight >= 0, "dkd", "ce_weight", self.ce_weight, "must be >= 0")
            check(self.alpha >= 0, "dkd", "alpha", self.alpha, "must be >= 0")
            check(self.beta >= 0, "dkd", "beta", self.beta, "must be >= 0")
            check_temperature("dkd", self.temperature)
            check(0 <= self.warmup_epochs <= MAX_EPOCHS, "dkd", "warmup_epochs", self.warmup_epochs,
                  f"must be >= 0 (0: no warm-up) and at most {MAX_EPOCHS:,} (the longest schedule ptd takes)")

    def warmup(self, epoch: int) -> float:
        w = self.options.warmup_epochs
        return 1.0 if w == 0 else min((epoch + 1) / w, 1.0)

    def forward(self, batch: DistillBatch) -> dict[str, torch.Tensor]:
        o = self.options
        T = o.temperature
        with float32(batch.s_logits.device):
            zs = batch.s_logits.float() / T
            zt = batch.t_logits.detach().float() / T
            B, C = zs.shape
            gt = torch.zeros_like(zs, dtype=torch.bool).scatter_(1, batch.y.view(-1, 1), True)
            # Binary distributions in log space: log p[g] and log(1 - p[g]) = lse(others) - lse(all).
            def binary(z: torch.Tensor) -> torch.Tensor:
                lse = z.logsumexp(1)
                return torch.stack([z[gt] - lse, z[~gt].view(B, C - 1).logsumexp(1) - lse], 1)

            bs, bt = binary(zs), binary(zt)
            tckd = (bt.exp() * (bt - bs)).sum(1).mean() * T * T
            ls = zs[~gt].view(B, C - 1).log_softmax(1)
            lt = zt[~gt].view(B, C - 1).log_softmax(1)
            nckd = (lt.exp() * (lt - ls)).sum(1).mean() * T * T
            w = self.warmup(batch.epoch)
            return {
                "ce": cross_entropy(batch.s_logits, batch.y, o.ce_weight),
                "dkd_tckd": w * o.alpha * tckd,
                "dkd_nckd": w * o.beta * nckd,
            }
