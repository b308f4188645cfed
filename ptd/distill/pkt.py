"""Probabilistic knowledge transfer (Passalis & Tefas, "Learning Deep Representations with
Probabilistic Knowledge Transfer", ECCV 2018).

Cosine-similarity kernel between the samples of a batch, turned into conditional probabilities:
with x_i the L2-normalized embedding, K_ij = (1 + x_i . x_j) / 2 and P_ij = K_ij / sum_j K_ij,

    loss = ce_weight * CE(z_s, y) + weight * mean_{i,j} P^t_ij * log((P^t_ij + eps) / (P^s_ij + eps))

(the reference code's KL, averaged over all B^2 entries, diagonal included; eps = 1e-7).
Weight 30000, CE weight 1, as in the RepDistiller/mdistiller CIFAR-100 benchmarks. Reads the
penultimate (pooled) features; widths may differ.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ptd.distill._common import check, cross_entropy, flat, float32, OneLayerLoss
from ptd.distill.base import PENULTIMATE, DistillBatch, register_loss

EPS = 1e-7


def conditional(f: torch.Tensor) -> torch.Tensor:
    x = flat(f)
    x = x / (x.norm(dim=1, keepdim=True) + EPS)
    k = (x @ x.t() + 1.0) / 2.0
    return k / k.sum(1, keepdim=True)


@register_loss("pkt")
class PKTLoss(OneLayerLoss):
    @dataclass(frozen=True)
    class Options:
        ce_weight: float = 1.0
        weight: float = 30000.0
        teacher_layer: str = PENULTIMATE
        student_layer: str = ""  # empty: the same name as teacher_layer

        def __post_init__(self) -> None:
            check(self.ce_weight >= 0, "pkt", "ce_weight", self.ce_weight, "must be >= 0")
            check(self.weight >= 0, "pkt", "weight", self.weight, "must be >= 0")

    def forward(self, batch: DistillBatch) -> dict[str, torch.Tensor]:
        o = self.options
        with float32(batch.s_logits.device):
            ps = conditional(batch.s_feats[self.s_name])
            pt = conditional(batch.t_feats[self.t_name].detach())
            kl = (pt * torch.log((pt + EPS) / (ps + EPS))).mean()
            return {"ce": cross_entropy(batch.s_logits, batch.y, o.ce_weight), "pkt": o.weight * kl}
