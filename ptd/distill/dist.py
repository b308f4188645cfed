"""DIST (Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022).

Matches correlations instead of probabilities: with Y = softmax(z / tau) ([B, C]) and
rho the Pearson correlation,

    inter = tau^2 * (1 - mean over samples b of rho(Y_s[b, :], Y_t[b, :]))   (inter-class relation)
    intra = tau^2 * (1 - mean over classes c of rho(Y_s[:, c], Y_t[:, c]))   (intra-class relation)
    loss  = ce_weight * CE(z_s, y) + beta * inter + gamma * intra

Defaults: the paper's and its reference code's beta = gamma = tau = 1, CE weight 1 (ImageNet
recipe). Its CIFAR-100 recipe sets tau = 4 (and beta = gamma = 2 in the released configs):
``distill.options.dist: {temperature: 4, beta: 2, gamma: 2}``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ptd.distill._common import check, check_temperature, cross_entropy, float32
from ptd.distill.base import DistillBatch, DistillLoss, register_loss

EPS = 1e-8  # added to the product of norms in the correlation, as the reference code does


def _pearson_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + EPS)


@register_loss("dist")
class DISTLoss(DistillLoss):
    @dataclass(frozen=True)
    class Options:
        ce_weight: float = 1.0
        beta: float = 1.0  # inter-class term
        gamma: float = 1.0  # intra-class term
        temperature: float = 1.0

        def __post_init__(self) -> None:
            check(self.ce_weight >= 0, "dist", "ce_weight", self.ce_weight, "must be >= 0")
            check(self.beta >= 0, "dist", "beta", self.beta, "must be >= 0")
            check(self.gamma >= 0, "dist", "gamma", self.gamma, "must be >= 0")
            check_temperature("dist", self.temperature)

    def forward(self, batch: DistillBatch) -> dict[str, torch.Tensor]:
        o = self.options
        T = o.temperature
        with float32(batch.s_logits.device):
            ys = (batch.s_logits.float() / T).softmax(1)
            yt = (batch.t_logits.detach().float() / T).softmax(1)
            inter = T * T * (1 - _pearson_rows(ys, yt).mean())
            intra = T * T * (1 - _pearson_rows(ys.t(), yt.t()).mean())
            return {
                "ce": cross_entropy(batch.s_logits, batch.y, o.ce_weight),
                "dist_inter": o.beta * inter,
                "dist_intra": o.gamma * intra,
            }
