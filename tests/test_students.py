"""Student derivation: the width rule against the paper's published plans, coupled groups, rebuild/surgery."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from ptd.models import build_from_spec, build_model
from ptd.pruning.masks import apply_masks, full_masks, prunable_weights
from ptd.pruning.select import global_topk
from ptd.students import DerivationError, StudentPlan, conv_width, derive_student, group_width, vgg_widths

VGG19 = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512]
PUBLISHED = {  # PAPER.md: published VGG19 student plans and their parameter counts (CIFAR-100 head)
    "st36": ([53, 61, "M", 128, 121, "M", 258, 241, 258, 236, "M", 485, 410, 406, 374, "M", 340, 358, 390, 399], 12_823_420),
    "st59": ([44, 56, "M", 116, 112, "M", 238, 227, 240, 209, "M", 408, 348, 339, 246, "M", 196, 214, 367, 272], 8_179_146),
    "st79": ([40, 49, "M", 111, 97, "M", 225, 187, 224, 170, "M", 356, 233, 220, 99, "M", 111, 84, 297, 122], 4_161_588),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread is faster, and immune to OpenMP stalls when the CPU is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def convs(plan):
    return [c for c in plan if c != "M"]


def published_nnz(widths, in_channels=3, k=3):
    """Surviving weights per conv if each pruned layer kept exactly what the published student layer holds."""
    prev, out = in_channels, []
    for w in widths:
        out.append(k * k * prev * w)
        prev = w
    return out


# ---------------------------------------------------------------- the rule itself


def test_conv_width_rounds_half_up_and_keeps_one_channel():
    assert conv_width(9 * 3 * 53, 9, 3) == 53
    assert conv_width(27 * 10 + 13, 9, 3) == 10  # 10.48 -> 10
    assert conv_width(27 * 10 + 14, 9, 3) == 11  # 10.52 -> 11
    assert conv_width(9 * 2 * 5, 9, 4) == 3  # 2.5 -> 3 (half up, not to even)
    assert conv_width(0, 9, 64) == 1
    with pytest.raises(ValueError):
        conv_width(10, 9, 0)


def test_group_width_is_weight_matching_and_reduces_to_the_layer_rule():
    assert group_width([9 * 64 * 50], [9 * 64]) == conv_width(9 * 64 * 50, 9, 64)
    # a 3x3 conv (fan-in 576) that kept 60 channels' worth and a 1x1 shortcut (fan-in 64) that kept 20:
    # the group width is their fan-in-weighted mean, (576*60 + 64*20) / 640 = 56
    assert group_width([576 * 60, 64 * 20], [576, 64]) == 56


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_plans_are_fixed_points_of_the_rule(name):
    plan, _ = PUBLISHED[name]
    s = convs(plan)
    assert vgg_widths(published_nnz(s), 3, in_channels=3) == s
    assert vgg_widths(published_nnz(s), [3] * len(s), in_channels=3) == s


def test_the_rule_divides_by_the_students_previous_width_not_the_teachers():
    """Dividing by the teacher's c_{l-1} would not give the published plans back."""
    s = convs(PUBLISHED["st36"][0])
    t = convs(VGG19)
    nnz = published_nnz(s)
    teacher_reading = [conv_width(n, 9, c) for n, c in zip(nnz, [3] + t[:-1])]
    assert teacher_reading != s
    assert vgg_widths(nnz, 3, 3) == s


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_plans_parameter_counts(name):
    plan, count = PUBLISHED[name]
    assert n_params(build_model("vgg", 100, 3, plan=plan)) == count
    assert n_params(build_model("vgg19", 100, 3)) == 20_086_692


# ---------------------------------------------------------------- VGG end to end


def masks_keeping(model: nn.Module, per_conv: list[int], seed: int = 0) -> dict:
    """Random masks keeping exactly per_conv[i] weights of the i-th conv (the classifier kept whole)."""
    g = torch.Generator().manual_seed(seed)
    masks, i = {}, 0
    for n, p in prunable_weights(model).items():
        keep = p.numel()
        if p.dim() == 4:
            keep, i = per_conv[i], i + 1
        m = torch.zeros(p.numel(), dtype=torch.bool)
        m[torch.randperm(p.numel(), generator=g)[:keep]] = True
        masks[n] = m.view_as(p)
    return masks


@pytest.fixture(scope="module")
def vgg19_teacher():
    torch.manual_seed(0)
    return build_model("vgg19", 100, 3)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_derive_reproduces_published_vgg19_students(vgg19_teacher, name):
    plan, count = PUBLISHED[name]
    masks = masks_keeping(vgg19_teacher, published_nnz(convs(plan)))
    student, sp = derive_student(vgg19_teacher, masks)
    assert isinstance(sp, StudentPlan)
    assert sp.spec == {"arch": "vgg", "num_classes": 100, "in_channels": 3, "width": 1.0, "plan": plan}
    assert student.ptd_spec["plan"] == plan
    assert n_params(student) == count
    assert json.loads(json.dumps(sp.spec)) == sp.spec
    assert sp.method == "rebuild" and sp.overrides == []
    rows = {r.name: r for r in sp.layers}
    assert rows["features.0"].teacher_width == 64 and rows["features.0"].width == plan[0]
    assert rows["classifier"].width == 100 and rows["classifier"].estimate is None


def test_derive_from_global_magnitude_pruned_vgg19_matches_surviving_weights(vgg19_teacher):
    teacher = vgg19_teacher
    params = prunable_weights(teacher)
    total = sum(p.numel() for p in params.values())
    masks = global_topk({n: p.detach().abs() for n, p in params.items()}, full_masks(params), round(total * (1 - 0.59)))
    student, sp = derive_student(teacher, masks)
    s_convs = [m for m in student.modules() if isinstance(m, nn.Conv2d)]
    t_nnz = [int(masks[n].sum()) for n, p in params.items() if p.dim() == 4]
    assert len(s_convs) == len(t_nnz) == 16
    for conv, kept in zip(s_convs, t_nnz):
        assert abs(conv.weight.numel() / kept - 1) < 0.03, (conv, kept)
    s_total = sum(c.weight.numel() for c in s_convs)
    assert abs(s_total / sum(t_nnz) - 1) < 0.01
    for row, conv in zip(sp.layers, s_convs):
        assert row.width == conv.out_channels and row.student_weights == conv.weight.numel()


def test_inherit_keeps_the_largest_channels():
    torch.manual_seed(1)
    teacher = build_model("vgg", 10, 3, plan=[16, "M", 32, 32])
    params = prunable_weights(teacher)
    total = sum(p.numel() for p in params.values())
    masks = global_topk({n: p.detach().abs() for n, p in params.items()}, full_masks(params), total // 2)
    apply_masks(teacher, masks)
    fresh, sp = derive_student(teacher, masks)
    student, sp2 = derive_student(teacher, masks, inherit=True)
    assert sp2.spec == sp.spec and sp2.inherit
    w0 = sp.widths()["features.0"]
    l1 = teacher.features[0].weight.detach().abs().flatten(1).sum(1)
    kept = sorted(torch.sort(-l1, stable=True).indices[:w0].tolist())
    assert torch.equal(student.features[0].weight, teacher.features[0].weight[kept])
    assert torch.equal(student.features[1].running_var, teacher.features[1].running_var[kept])
    assert not torch.equal(fresh.features[0].weight, student.features[0].weight)


def test_no_conv_model_is_refused_with_a_reason():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    with pytest.raises(DerivationError, match="no Conv2d layers"):
        derive_student(model, full_masks(prunable_weights(model)))


def test_rebuild_from_spec_text(vgg19_teacher):
    masks = masks_keeping(vgg19_teacher, published_nnz(convs(PUBLISHED["st79"][0])))
    student, sp = derive_student(vgg19_teacher, masks)
    again = build_from_spec(json.loads(json.dumps(sp.spec)))
    again.load_state_dict(student.state_dict())
    x = torch.randn(2, 3, 32, 32)
    student.eval(), again.eval()
    assert torch.equal(student(x), again(x))
