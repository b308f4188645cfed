"""Similarity-preserving KD (Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019).

With Q = the layer's activations flattened to [B, D], G = Q Q^T ([B, B]) with each row
L2-normalized:

    loss = ce_weight * CE(z_s, y) + gamma * sum_l ||G_t^l - G_s^l||_F^2 / B^2

gamma = 3000 for CIFAR in the paper and in the RepDistiller/mdistiller benchmarks (CE weight 1).
Any shapes pair up (the B x B Gram matrix forgets the feature width). Default layer: the last
stage's output (``layer3`` in ptd's CIFAR ResNets, ``block3`` in its WRNs).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ptd.distill._common import check, check_layer_lists, cross_entropy, flat, float32, LayerPairsLoss
from ptd.distill.base import DistillBatch, register_loss


def gram(f: torch.Tensor) -> torch.Tensor:
    q = flat(f)
    return F.normalize(q @ q.t(), dim=1)


@register_loss("sp")
class SPLoss(LayerPairsLoss):
    @dataclass(frozen=True)
    class Options:
        ce_weight: float = 1.0
        gamma: float = 3000.0
        teacher_layers: tuple[str, ...] = ("layer3",)
        student_layers: tuple[str, ...] = ()  # empty: the teacher's names

        def __post_init__(self) -> None:
            check(self.ce_weight >= 0, "sp", "ce_weight", self.ce_weight, "must be >= 0")
            check(self.gamma >= 0, "sp", "gamma", self.gamma, "must be >= 0")
            check_layer_lists("sp", self.teacher_layers, self.student_layers)

    def forward(self, batch: DistillBatch) -> dict[str, torch.Tensor]:
        o = self.options
        with float32(batch.s_logits.device):
            total = batch.s_logits.new_zeros((), dtype=torch.float32)
            for t_name, s_name in self.pairs:
                gs, gt = gram(batch.s_feats[s_name]), gram(batch.t_feats[t_name].detach())
                total = total + (gt - gs).pow(2).sum() / gs.shape[0] ** 2
            return {"ce": cross_entropy(batch.s_logits, batch.y, o.ce_weight), "sp": o.gamma * total}
