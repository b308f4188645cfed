"""Relational KD (Park et al., "Relational Knowledge Distillation", CVPR 2019): distance + angle.

On the batch's embeddings e_i (flattened):
- distance: psi_D(i, j) = ||e_i - e_j|| / mu, mu the mean over pairs i != j;
- angle: psi_A(i, j, k) = <(e_i - e_j) / ||e_i - e_j||, (e_k - e_j) / ||e_k - e_j||> over all
  triples (reference code: every ordered triple, degenerate ones i = j or k = j count as 0);

    loss = ce_weight * CE(z_s, y) + w_d * huber(psi_D^s, psi_D^t) + w_a * huber(psi_A^s, psi_A^t)

Huber = smooth L1 with threshold 1, averaged over entries. w_d = 25, w_a = 50 (the paper's
values; RepDistiller and mdistiller keep them), CE weight 1. Reads the penultimate (pooled)
features; widths may differ (only distances and angles are compared).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ptd.distill._common import check, cross_entropy, flat, float32, OneLayerLoss
from ptd.distill.base import PENULTIMATE, DistillBatch, register_loss

EPS = 1e-12  # squared distances are clamped here before the sqrt (its gradient at 0 is infinite)


def distances(e: torch.Tensor) -> torch.Tensor:
    sq = e.pow(2).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * e @ e.t()).clamp(min=EPS)
    d = d2.sqrt() * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))
    return d / d[d > 0].mean()


def angles(e: torch.Tensor) -> torch.Tensor:
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)  # [j, i] = e_i - e_j, unit
    return torch.bmm(diff, diff.transpose(1, 2)).flatten()


@register_loss("rkd")
class RKDLoss(OneLayerLoss):
    @dataclass(frozen=True)
    class Options:
        ce_weight: float = 1.0
        distance_weight: float = 25.0
        angle_weight: float = 50.0
        teacher_layer: str = PENULTIMATE
        student_layer: str = ""  # empty: the same name as teacher_layer

        def __post_init__(self) -> None:
            check(self.ce_weight >= 0, "rkd", "ce_weight", self.ce_weight, "must be >= 0")
            check(self.distance_weight >= 0, "rkd", "distance_weight", self.distance_weight, "must be >= 0")
            check(self.angle_weight >= 0, "rkd", "angle_weight", self.angle_weight, "must be >= 0")

    def forward(self, batch: DistillBatch) -> dict[str, torch.Tensor]:
        o = self.options
        with float32(batch.s_logits.device):
            es, et = flat(batch.s_feats[self.s_name]), flat(batch.t_feats[self.t_name].detach())
            dist = F.smooth_l1_loss(distances(es), distances(et))
            ang = F.smooth_l1_loss(angles(es), angles(et))
            return {
                "ce": cross_entropy(batch.s_logits, batch.y, o.ce_weight),
                "rkd_distance": o.distance_weight * dist,
                "rkd_angle": o.angle_weight * ang,
            }
