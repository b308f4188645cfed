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

from ptd.distill._common import check, cross_entropy, flat, float32, layer_shape
from ptd.distill.base import DistillBatch, DistillLoss, LossSetup, register_loss


def gram(f: torch.Tensor) -> torch.Tensor:
    q = flat(f)
    return F.normalize(q @ q.t(), dim=1)


@register_loss("sp")
class SPLoss(DistillLoss):
    @dataclass(frozen=True)
    class Options:
        ce_weight: float = 1.0
        gamma: float = 3000.0
        teacher_layers: tuple[str, ...] = ("layer3",)
        student_layers: tuple[str, ...] = ()  # empty: the teacher's names

        def __post_init__(self) -> None:
            check(self.ce_weight >= 0, "sp", "ce_weight", self.ce_weight, "must be >= 0")
            check(self.gamma >= 0, "sp", "gamma", self.gamma, "must be >= 0")
            check(len(self.teacher_layers) > 0, "sp", "teacher_layers", list(self.teacher_layers), "needs at least one layer")
            check(len(self.student_layers) in (0, len(self.teacher_layers)), "sp", "student_layers", list(self.student_layers),
                  f"must be empty or list {len(self.teacher_layers)} layers, one per teacher layer")

    @classmethod
    def feature_layers(cls, options: Options) -> tuple[list[str], list[str]]:
        return list(options.teacher_layers), list(options.student_layers or options.teacher_layers)

    def __init__(self, options: Options, setup: LossSetup):
        super().__init__(options, setup)
        self.pairs = list(zip(*self.feature_layers(options)))
        for t_name, s_name in self.pairs:  # any shapes work; only check the probe saw them
            layer_shape("sp", "teacher", setup.teacher_shapes, t_name)
            layer_shape("sp", "student", setup.student_shapes, s_name)

    def forward(self, batch: DistillBatch) -> dict[str, torch.Tensor]:
        o = self.options
        with float32(batch.s_logits.device):
            total = batch.s_logits.new_zeros((), dtype=torch.float32)
            for t_name, s_name in self.pairs:
                gs, gt = gram(batch.s_feats[s_name]), gram(batch.t_feats[t_name].detach())
                total = total + (gt - gs).pow(2).sum() / gs.shape[0] ** 2
            return {"ce": cross_entropy(batch.s_logits, batch.y, o.ce_weight), "sp": o.gamma * total}
