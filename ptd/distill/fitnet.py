"""FitNets (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015), single stage.

A trainable regressor r maps the student's guided layer onto the teacher's hint layer:

    loss = ce_weight * CE(z_s, y) + weight * mean((r(F_s) - F_t)^2)

The paper trains the hint in a separate first stage; the CRD benchmark (RepDistiller, "hint")
and mdistiller train it jointly with CE, weight 100, hint = the output of the second stage
(``layer2`` in ptd's ResNets, ``block2`` in its WRNs). That single-stage form is what this is.

Regressor, sized from the probed shapes (the reference code's rule for [C, H, W] maps):
student H = 2 x teacher H: 3x3 conv, stride 2; student H = teacher H / 2: 4x4 transposed conv,
stride 2; student H >= teacher H: conv with kernel (1 + Hs - Ht, 1 + Ws - Wt) (1x1 when equal);
then BatchNorm and (``relu``) ReLU. Flat [D] features get a Linear. Anything else is refused.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ptd.distill._common import check, cross_entropy, float32, OneLayerLoss, shape_error
from ptd.distill.base import DistillBatch, LossSetup, register_loss


def make_regressor(s: tuple[int, ...], t: tuple[int, ...], relu: bool, where: tuple[str, str]) -> nn.Module:
    t_name, s_name = where
    if len(s) == 1 and len(t) == 1:
        return nn.Linear(s[0], t[0])
    if len(s) != 3 or len(t) != 3:
        raise shape_error("fitnet", t_name, t, s_name, s, "needs two [C, H, W] maps or two flat [D] features")
    (cs, hs, ws), (ct, ht, wt) = s, t
    if hs == 2 * ht and ws == 2 * wt:
        conv: nn.Module = nn.Conv2d(cs, ct, 3, stride=2, padding=1)
    elif 2 * hs == ht and 2 * ws == wt:
        conv = nn.ConvTranspose2d(cs, ct, 4, stride=2, padding=1)
    elif hs >= ht and ws >= wt:
        conv = nn.Conv2d(cs, ct, (1 + hs - ht, 1 + ws - wt))
    else:
        raise shape_error("fitnet", t_name, t, s_name, s,
                          "the student map is smaller than the teacher's and not half its size; pick layers of matching resolution")
    layers = [conv, nn.BatchNorm2d(ct)] + ([nn.ReLU()] if relu else [])
    return nn.Sequential(*layers)


@register_loss("fitnet")
class FitNetLoss(OneLayerLoss):
    @dataclass(frozen=True)
    class Options:
        ce_weight: float = 1.0
        weight: float = 100.0  # RepDistiller "hint" -b 100; mdistiller FITNET.LOSS.FEAT_WEIGHT 100
        teacher_layer: str = "layer2"  # the hint: output of the middle stage (HINT_LAYER 2 in mdistiller)
        student_layer: str = ""  # the guided layer; empty: the same name as teacher_layer
        relu: bool = True  # ReLU after the regressor's BatchNorm, as the reference ConvReg

        def __post_init__(self) -> None:
            check(self.ce_weight >= 0, "fitnet", "ce_weight", self.ce_weight, "must be >= 0")
            check(self.weight >= 0, "fitnet", "weight", self.weight, "must be >= 0")
            check(bool(self.teacher_layer), "fitnet", "teacher_layer", self.teacher_layer, "must name a module of the teacher")

    def __init__(self, options: Options, setup: LossSetup):
        super().__init__(options, setup)
        self.regressor = make_regressor(self.s_shape, self.t_shape, options.relu, (self.t_name, self.s_name))

    def forward(self, batch: DistillBatch) -> dict[str, torch.Tensor]:
        o = self.options
        fs = self.regressor(batch.s_feats[self.s_name])  # under the caller's autocast
        ft = batch.t_feats[self.t_name].detach()
        with float32(fs.device):
            hint = (fs.float() - ft.float()).pow(2).mean()
            return {"ce": cross_entropy(batch.s_logits, batch.y, o.ce_weight), "fitnet": o.weight * hint}
