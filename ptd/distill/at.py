"""Attention transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017).

For a map F of shape [C, H, W] the attention map is a(F) = vec(mean over c of F_c^p), L2-normalized
over its H*W entries. Over the paired layers l:

    loss = ce_weight * CE(z_s, y) + beta * sum_l mean_{b, j} (a(F_s^l)_{b,j} - a(F_t^l)_{b,j})^2

(the reference code's form of the paper's ||a_s - a_t||: squared and averaged; p = 2, beta =
1000, CE weight 1, in the paper and in the RepDistiller/mdistiller benchmarks). Channel counts
may differ (the map averages them away). Spatial sizes may differ too: the larger map is
average-pooled to the smaller one's size first, as the reference code does.
Default layers: every stage output of ptd's ResNets (``layer1..3``); ``block1..3`` for WRNs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ptd.distill._common import check, check_layer_lists, cross_entropy, float32, LayerPairsLoss, shape_error
from ptd.distill.base import DistillBatch, LossSetup, register_loss


def attention(f: torch.Tensor, p: float) -> torch.Tensor:
    return F.normalize(f.pow(p).mean(1).flatten(1), dim=1)


@register_loss("at")
class ATLoss(LayerPairsLoss):
    @dataclass(frozen=True)
    class Options:
        ce_weight: float = 1.0
        beta: float = 1000.0
        p: float = 2.0
        teacher_layers: tuple[str, ...] = ("layer1", "layer2", "layer3")
        student_layers: tuple[str, ...] = ()  # empty: the teacher's names

        def __post_init__(self) -> None:
            check(self.ce_weight >= 0, "at", "ce_weight", self.ce_weight, "must be >= 0")
            check(self.beta >= 0, "at", "beta", self.beta, "must be >= 0")
            check(self.p > 0, "at", "p", self.p, "must be > 0")
            check_layer_lists("at", self.teacher_layers, self.student_layers)

    def __init__(self, options: Options, setup: LossSetup):
        super().__init__(options, setup)
        self.sizes = []
        for (t_name, s_name), (t, s) in zip(self.pairs, self.shapes):
            if len(t) != 3 or len(s) != 3:
                raise shape_error("at", t_name, t, s_name, s, "attention transfer needs [C, H, W] feature maps")
            self.sizes.append((min(t[1], s[1]), min(t[2], s[2])))

    def forward(self, batch: DistillBatch) -> dict[str, torch.Tensor]:
        o = self.options
        with float32(batch.s_logits.device):
            total = batch.s_logits.new_zeros((), dtype=torch.float32)
            for (t_name, s_name), size in zip(self.pairs, self.sizes):
                fs, ft = batch.s_feats[s_name].float(), batch.t_feats[t_name].detach().float()
                if fs.shape[2:] != size:
                    fs = F.adaptive_avg_pool2d(fs, size)
                if ft.shape[2:] != size:
                    ft = F.adaptive_avg_pool2d(ft, size)
                total = total + (attention(fs, o.p) - attention(ft, o.p)).pow(2).mean()
            return {"ce": cross_entropy(batch.s_logits, batch.y, o.ce_weight), "at": o.beta * total}
