import math

import pytest
import torch
import torch.nn as nn

from ptd.distill import LOSSES, build_loss, distillation_step
from ptd.models import build_model
from ptd.registry import UnknownNameError


def hand_kd(s, t, y, alpha, T):
    """The paper's loss written out element by element in plain Python floats."""
    B, C = len(s), len(s[0])
    kl = 0.0
    ce = 0.0
    for i in range(B):
        zs = [v / T for v in s[i]]
        zt = [v / T for v in t[i]]
        ls = [v - math.log(sum(math.exp(u) for u in zs)) for v in zs]
        lt = [v - math.log(sum(math.exp(u) for u in zt)) for v in zt]
        kl += sum(math.exp(lt[c]) * (lt[c] - ls[c]) for c in range(C))
        ce += -(s[i][y[i]] - math.log(sum(math.exp(u) for u in s[i])))
    return alpha * T * T * kl / B + (1 - alpha) * ce / B


@pytest.mark.parametrize("alpha, T", [(0.95, 10.0), (0.5, 4.0), (1.0, 1.0), (0.0, 3.0)])
def test_kd_equals_hand_computation(alpha, T):
    s = [[1.0, -2.0, 0.5], [0.3, 0.2, -1.0]]
    t = [[2.0, 0.0, -1.0], [-0.5, 1.5, 0.1]]
    y = [0, 2]
    got = build_loss("kd", alpha, T)(torch.tensor(s), torch.tensor(t), torch.tensor(y)).item()
    assert got == pytest.approx(hand_kd(s, t, y, alpha, T), rel=5e-5, abs=1e-6)  # float32 inside the loss


def test_kd_zero_when_student_equals_teacher_and_alpha_one():
    z = torch.randn(4, 10)
    assert build_loss("kd", 1.0, 10.0)(z, z.clone(), torch.zeros(4, dtype=torch.long)).item() == pytest.approx(0.0, abs=1e-6)


def test_unknown_loss_lists_names():
    with pytest.raises(UnknownNameError, match="kd"):
        LOSSES.get("nope")


def test_distillation_step_teacher_frozen_and_in_eval():
    torch.manual_seed(0)
    teacher = build_model("vgg", 10, 1, plan=[8, "M", 8])
    teacher.train()
    student = build_model("vgg", 10, 1, plan=[4, "M", 4])
    bn = teacher.features[1]
    before = (bn.running_mean.clone(), [p.clone() for p in teacher.parameters()])
    step = distillation_step(teacher, build_loss("kd", 0.95, 10.0))
    x, y = torch.randn(8, 1, 12, 12), torch.randint(0, 10, (8,))
    loss, logits = step(student, x, y)
    loss.backward()
    assert not teacher.training  # eval mode: BatchNorm uses running statistics
    assert torch.equal(bn.running_mean, before[0])  # no statistics drift from the student's batches
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert logits.shape == (8, 10)
