"""Model families: every registered name builds, runs forward/backward, and rebuilds from its spec."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from conftest import n_params

from ptd.models import MODELS, build_from_spec, build_model, spec_to_text
from ptd.registry import UnknownNameError

TV_NAMES = ["tv:resnet18", "tv:mobilenet_v2", "tv:efficientnet_b0"]


def small_kwargs(arch: str) -> dict:
    """Cheap settings per family so the whole file runs in well under a minute on 2 CPU cores."""
    if arch == "vgg":
        return {"plan": [8, "M", 16, 16], "width": 1.0}
    if arch.startswith("tv:"):
        return {"width": 0.25} if arch == "tv:mobilenet_v2" else {}
    if arch in ("resnet101", "resnet152", "wrn28_10"):
        return {"width": 0.0625}
    if arch.startswith(("wrn", "resnet20", "resnet32", "resnet56", "resnet110")):
        return {"width": 0.5}
    return {"width": 0.125}


pytestmark = pytest.mark.usefixtures("one_thread")


CASES = [(a, 3) for a in MODELS.names() + TV_NAMES] + [(a, 1) for a in ("vgg11", "resnet20", "resnet18", "wrn16_1", "mobilenetv2", "tv:resnet18")]


@pytest.mark.parametrize("arch,in_channels", CASES)
def test_forward_backward_and_spec_roundtrip(arch, in_channels):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=7, in_channels=in_channels, **small_kwargs(arch))
    x = torch.randn(2, in_channels, 32, 32)
    y = model(x)
    assert y.shape == (2, 7)
    y.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    spec = json.loads(spec_to_text(model.ptd_spec))
    again = build_from_spec(spec)
    assert [(n, p.shape) for n, p in again.named_parameters()] == [(n, p.shape) for n, p in model.named_parameters()]
    again.load_state_dict(model.state_dict())
    model.eval(), again.eval()
    assert torch.equal(model(x), again(x))


@pytest.mark.parametrize(
    "arch,classes,count",
    [
        ("resnet20", 10, 272_474),  # He et al.: 0.27M
        ("resnet56", 10, 855_770),  # 0.85M
        ("resnet110", 10, 1_730_714),  # 1.7M
        ("wrn16_4", 10, 2_748_890),  # Zagoruyko & Komodakis: 2.7M
        ("wrn28_10", 10, 36_479_194),  # 36.5M
        ("wrn40_2", 10, 2_243_546),  # 2.2M
        ("mobilenetv2", 10, 2_236_682),  # = torchvision's mobilenet_v2 at 10 classes
        ("resnet18", 200, 11_271_432),  # torchvision resnet18 with a 3x3 stem, 200 classes
    ],
)
def test_reference_parameter_counts(arch, classes, count):
    assert n_params(build_model(arch, classes)) == count


def test_resnet18_imagenet_stem_matches_torchvision():
    import torchvision

    ours = build_model("resnet18", 1000, stem="imagenet")
    assert n_params(ours) == n_params(torchvision.models.resnet18(weights=None))
    assert ours(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    assert n_params(build_model("resnet50", 1000, stem="imagenet")) == n_params(torchvision.models.resnet50(weights=None))


@pytest.mark.parametrize(
    "name,stages,fraction",
    [("st36", [58, 113, 216, 398], 0.645), ("st59", [54, 102, 184, 305], 0.416), ("st79", [49, 85, 140, 198], 0.210)],
)
def test_paper_resnet18_student_plans(name, stages, fraction):
    """PAPER.md's ResNet18 plans (one width per stage, the stem kept at 64) give the published size fractions."""
    teacher = build_model("resnet18", 200)
    student = build_model("resnet18", 200, stage_widths=stages, block_widths=[[w, w] for w in stages], stem_width=64)
    assert round(n_params(student) / n_params(teacher), 3) == fraction
    assert student.layer1[0].shortcut is not None  # 64 -> 58: the stem's width differs, so a projection


def test_explicit_widths_and_projection_choice():
    m = build_model("resnet20", 10, stage_widths=[12, 20, 40], block_widths=[[5, 6, 7], [8, 9, 10], [11, 12, 13]], stem_width=12)
    assert m.conv1.out_channels == 12 and m.layer1[2].conv1.out_channels == 7 and m.layer3[0].conv2.out_channels == 40
    assert m.layer1[0].shortcut is None and m.layer2[0].shortcut is not None
    forced = build_model("resnet20", 10, stage_widths=[12, 20, 40], stem_width=12, projections=[True, True, True])
    assert forced.layer1[0].shortcut is not None
    w = build_model("wrn16_2", 10, stage_widths=[16, 40, 70], stem_width=16, projections=[True, True, True])
    assert w.block1[0].shortcut is not None
    assert w(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    b = build_model("resnet50", 10, width=0.25, block_widths=[[[3, 4]] * 3, [[5, 6]] * 4, [[7, 8]] * 6, [[9, 10]] * 3])
    assert [b.layer4[2].conv1.out_channels, b.layer4[2].conv2.out_channels] == [2, 2]  # 9 * 0.25, 10 * 0.25
    assert b.conv1.out_channels == 16 and b.layer1[0].conv3.out_channels == 64  # bottleneck: stem 64, stage 256 (x0.25)


def test_mobilenetv2_width_multiplier_and_explicit_widths():
    m = build_model("mobilenetv2", 10, width=0.5)
    assert m.features[0][0].out_channels == 16 and m.features[-1][0].out_channels == 1280
    stage = [8, 16, 24, 40, 56, 96, 200]
    blocks = [[8], [30, 40], [50, 60, 70], [80] * 4, [90] * 3, [100] * 3, [110]]
    s = build_model("mobilenetv2", 10, stem_width=8, stage_widths=stage, block_widths=blocks, last_width=300)
    assert s.features[3].dw[0].out_channels == 40 and s.features[3].dw[0].groups == 40
    assert [b.residual for b in s.features[1:18]] == [False, False, True, False, True, True, False, True, True, True, False, True, True, False, True, True, False]
    assert s(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(ValueError, match="expansion-1"):
        build_model("mobilenetv2", 10, stem_width=8, stage_widths=stage, block_widths=[[9]] + blocks[1:], last_width=300)


def test_torchvision_builder_errors():
    with pytest.raises(ValueError, match="no width multiplier"):
        build_model("tv:resnet18", 10, width=0.5)
    with pytest.raises(UnknownNameError, match="tv:resnet18"):
        build_model("tv:resnet17", 10)
    m = build_model("tv:mobilenet_v2", 10, 1, width=0.5)
    assert m.features[0][0].in_channels == 1


def test_unknown_family_argument_is_refused():
    with pytest.raises(TypeError, match="unknown argument"):
        build_model("resnet18", 10, stage_width=[1, 2, 3, 4])


# ---------------------------------------------------------------- ptd.measure


def test_measure_counts_flops_and_latency():
    from ptd.measure import compare_latency, count_nonzero, count_params, flops, latency, layer_widths, summarize

    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    with torch.no_grad():
        m[0].weight[:4] = 0
    assert count_params(m) == 3 * 8 * 9 + 8 * 5 + 5
    assert count_nonzero(m) == count_params(m) - 4 * 27 - int((m[4].weight == 0).sum()) - int((m[4].bias == 0).sum())
    # FlopCounterMode: 2 x MACs for conv and linear only
    assert flops(m, (1, 3, 16, 16)) == 2 * (8 * 27 * 16 * 16) + 2 * 8 * 5
    assert flops(m, (3, 16, 16)) == flops(m, (1, 3, 16, 16))
    assert flops(m, (2, 3, 16, 16)) == 2 * flops(m, (3, 16, 16))
    lat = latency(m, (3, 16, 16), batch_size=2, repeats=5, warmup=1)
    assert lat["p10_ms"] <= lat["median_ms"] <= lat["p90_ms"] and lat["batch_size"] == 2
    both = compare_latency({"a": m, "b": m}, (3, 16, 16), 1, repeats=3, warmup=0)
    assert set(both) == {"a", "b"} and both["a"]["repeats"] == 3
    assert layer_widths(m) == [("0", 8), ("4", 5)]
    s = summarize(m, (3, 16, 16), masks={"0.weight": m[0].weight != 0}, measure_latency=True, batch_sizes=(1,), repeats=2)
    assert s["params"] == count_params(m) and s["alive_weights"] == 4 * 27 and s["latency"]["1"]["repeats"] == 2
    assert m.training  # left as it was


# ---------------------------------------------------------------- the CIFAR-100 distillation benchmark (CRD / RepDistiller)

# Exact counts of ptd's builds at 100 classes (conv, BN, Linear, biases), and the published figure
# (M params, two decimals: the benchmark's model tables). ptd's names: RepDistiller's wrn_40_2 is wrn40_2.
BENCHMARK = {
    "resnet8x4": (1_233_540, 1.23), "resnet32x4": (7_433_860, 7.43), "vgg8": (3_965_028, 3.96), "vgg13": (9_462_180, 9.46),
    "wrn40_2": (2_255_156, 2.25), "wrn16_2": (703_284, 0.70), "wrn40_1": (569_780, 0.57), "resnet56": (861_620, 0.86),
    "resnet20": (278_324, 0.28), "resnet110": (1_736_564, 1.73), "resnet32": (472_756, 0.47),
}


@pytest.mark.parametrize("arch", sorted(BENCHMARK))
def test_benchmark_parameter_counts_match_the_published_ones(arch):
    exact, published = BENCHMARK[arch]
    n = n_params(build_model(arch, 100))
    assert n == exact
    assert abs(n / 1e6 - published) < 0.01  # published figures are rounded or truncated to 0.01M


def test_benchmark_shapes_follow_repdistiller():
    r = build_model("resnet8x4", 100)
    assert r.conv1.out_channels == 32 and r.layer1[0].shortcut is not None and r.fc.in_features == 256
    assert [len(s) for s in build_model("resnet32x4", 100).stages()] == [5, 5, 5]
    # vgg8/vgg13: three pools on 32x32, so the last conv block runs at 4x4 (RepDistiller skips its 4th pool)
    for arch, last in (("vgg8", 17), ("vgg13", 32)):
        m = build_model(arch, 100)
        seen = {}
        m.features[last].register_forward_hook(lambda mod, a, out: seen.__setitem__("out", out.shape))
        m(torch.randn(1, 3, 32, 32))
        assert seen["out"] == (1, 512, 4, 4), arch


# Layer names the shipped configs point the feature losses at (docs/distillation.md lists them).
BENCHMARK_LAYERS = {
    "resnet": {"hint": "layer2", "stages": ("layer1", "layer2", "layer3")},
    "wrn": {"hint": "block2", "stages": ("block1", "block2", "block3")},
    # vgg: the ReLU closing each conv block after the first (RepDistiller's f1..f4); hint = f2
    "vgg8": {"hint": "features.10", "stages": ("features.6", "features.10", "features.14", "features.17")},
    "vgg13": {"hint": "features.19", "stages": ("features.12", "features.19", "features.26", "features.32")},
}


def benchmark_layers(arch: str) -> dict:
    return BENCHMARK_LAYERS[arch] if arch.startswith("vgg") else BENCHMARK_LAYERS["wrn" if arch.startswith("wrn") else "resnet"]


@pytest.mark.parametrize("arch", sorted(BENCHMARK))
def test_benchmark_families_derive_students_that_keep_the_layer_names(arch):
    from ptd.pruning.masks import apply_masks, full_masks, prunable_weights
    from ptd.pruning.select import global_topk
    from ptd.students import derive_student

    torch.manual_seed(0)
    teacher = build_model(arch, 100, width=0.25)
    params = prunable_weights(teacher)
    keep = round(sum(p.numel() for p in params.values()) * 0.5)
    masks = global_topk({n: p.detach().abs() for n, p in params.items()}, full_masks(params), keep)
    apply_masks(teacher, masks)
    student, plan = derive_student(teacher, masks)
    assert plan.method == "rebuild" and n_params(student) < n_params(teacher)
    names = dict(student.named_modules())
    layers = benchmark_layers(arch)
    t_names = set(dict(teacher.named_modules()))
    assert {layers["hint"], *layers["stages"]} <= set(names) and t_names <= set(names)
    # The only modules a student adds are 1x1 projection shortcuts where a block's input and output
    # widths come to differ (the stem keeps its width, as in the paper's ResNet students).
    assert all(".shortcut" in n for n in set(names) - t_names), sorted(set(names) - t_names)
    assert student(torch.randn(2, 3, 32, 32)).shape == (2, 100)


# The three published pairs of the shipped GPU configs, each loss with the configs' layers.
PAIRS = [("resnet32x4", "resnet8x4"), ("vgg13", "vgg8"), ("wrn40_2", "wrn16_2")]


@pytest.mark.parametrize("teacher_arch,student_arch", PAIRS)
def test_every_loss_runs_on_the_published_pairs(teacher_arch, student_arch):
    import ptd.distill  # noqa: F401
    from ptd.distill.base import LOSSES, DistillBatch, LossSetup
    from test_losses import capture

    torch.manual_seed(0)
    teacher, student = build_model(teacher_arch, 100).eval(), build_model(student_arch, 100)
    lt, ls = benchmark_layers(teacher_arch), benchmark_layers(student_arch)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 100, (4,))
    per_loss = {
        "fitnet": {"teacher_layer": lt["hint"], "student_layer": ls["hint"]},
        "at": {"teacher_layers": lt["stages"], "student_layers": ls["stages"]},
        "sp": {"teacher_layers": lt["stages"][-1:], "student_layers": ls["stages"][-1:]},
        "crd": {"nce_k": 64},
    }
    for name in LOSSES.names():
        cls = LOSSES.get(name)
        if not cls.__module__.startswith("ptd."):  # a loss another test registered for itself
            continue
        fields = {f.name for f in __import__("dataclasses").fields(cls.Options)}
        opts = cls.Options(**{k: v for k, v in per_loss.get(name, {}).items() if k in fields})
        t_layers, s_layers = cls.feature_layers(opts)
        with torch.no_grad():
            t_logits, t_feats = capture(teacher, t_layers, x)
        s_logits, s_feats = capture(student, s_layers, x)
        setup = LossSetup(100, 1000, {k: tuple(v.shape[1:]) for k, v in t_feats.items()},
                          {k: tuple(v.shape[1:]) for k, v in s_feats.items()}, epochs=240)
        terms = cls(opts, setup)(DistillBatch(y, torch.arange(4), 0, s_logits, t_logits, s_feats, t_feats))
        value = sum(terms.values())
        assert torch.isfinite(value), name
        value.backward()
        student.zero_grad()


@pytest.mark.parametrize("config", ["resnet32x4_resnet8x4", "vgg13_vgg8", "wrn40_2_wrn16_2"])
def test_benchmark_config_comment_switches_to_valid_loss_options(config):
    """The `options:` a config's comment tells users to set builds every loss, on layers both models have."""
    import yaml

    import ptd.distill  # noqa: F401
    from ptd.config import load_config
    from ptd.distill.base import LOSSES, PENULTIMATE

    path = __import__("pathlib").Path(__file__).parent.parent / "configs" / f"cifar100_{config}.yaml"
    cfg = load_config(path)
    line = next(ln for ln in path.read_text().splitlines() if ln.startswith("#   options:"))
    options = yaml.safe_load(line[len("#   options:"):])
    losses = yaml.safe_load(next(ln for ln in path.read_text().splitlines() if ln.startswith("#   loss:"))[len("#   loss:"):])
    t_names = set(dict(build_model(cfg.teacher.model.arch, 100).named_modules())) | {PENULTIMATE}
    s_names = set(dict(build_model(cfg.student.model.arch, 100).named_modules())) | {PENULTIMATE}
    assert set(options) <= set(LOSSES.names()) and set(losses) <= set(LOSSES.names()) | {"kd"}
    for name in (set(losses) | set(options)) - {"kd"}:
        cls = LOSSES.get(name)
        opts = cls.Options(**{k: tuple(v) if isinstance(v, list) else v for k, v in options.get(name, {}).items()})
        t_layers, s_layers = cls.feature_layers(opts)
        assert set(t_layers) <= t_names and set(s_layers) <= s_names, name


@pytest.mark.parametrize("arch", ["tv:inception_v3", "tv:googlenet"])
def test_torchvision_models_build_without_a_warning_on_stderr(arch):
    """Left unset, torchvision's init_weights made a FutureWarning of 2 lines above ptd's one-line
    refusals (tv:inception_v3 at 32 px: 3 lines on stderr). ptd states the default it used."""
    import warnings

    from ptd.models import build_model

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = build_model(arch, 10, 3)
    assert m.ptd_spec["arch"] == arch


def test_an_unknown_name_that_is_a_family_stem_lists_the_family():
    """'resnet' got "did you mean 'resnet56'?", one of eleven resnets picked by spelling alone
    (new-user audit): a stem lists the family; a typo still gets its nearest name."""
    with pytest.raises(UnknownNameError, match=r"unknown model 'resnet' \(did you mean one of 'resnet18', 'resnet20', .*'resnet32x4'\?\)"):
        MODELS.get("resnet")
    assert MODELS.meant("resnt56") == " (did you mean 'resnet56'?)"
    assert MODELS.meant("wrn_40_2") == " (did you mean 'wrn40_2'?)"  # the same letters and digits
    assert MODELS.meant("VGG") == " (did you mean 'vgg'?)"  # a name in another case is that name, not its family
