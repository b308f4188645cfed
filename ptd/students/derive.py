"""derive_student: a dense student with physically fewer channels, from a pruned teacher."""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

from ptd.config import StudentConfig
from ptd.pruning.masks import Masks, check_masks, unwrap
from ptd.students.graph import DerivationError, extract, pin_layer
from ptd.students.plan import StudentPlan
from ptd.students.rebuild import spec_builder, stem_pin
from ptd.students.solve import RULE, solve
from ptd.students.surgery import apply_widths, check_widths, copy_overlap, l1_keep


def _reinit(model: nn.Module) -> None:
    for m in model.modules():
        if hasattr(m, "reset_parameters") and callable(m.reset_parameters):
            m.reset_parameters()


def check_runs(teacher: nn.Module, student: nn.Module, size: int) -> None:
    """The student must run on the traced image size and give the teacher's output shape: a group
    whose channels Torch-Pruning mapped wrongly can pass every width check and still build a model
    whose forward fails."""
    from ptd.students.graph import _describe, first_conv

    p = next(teacher.parameters())
    # A generator of its own: the check must not move the global RNG (CPU or CUDA), so runs stay as they were.
    x = torch.randn(1, first_conv(teacher).in_channels, size, size, generator=torch.Generator().manual_seed(0)).to(p.device, p.dtype)
    was = teacher.training, student.training
    teacher.eval(), student.eval()  # eval: no BatchNorm statistics change, no auxiliary heads
    try:
        with torch.no_grad():
            want, got = teacher(x), student(x)
    except Exception as e:  # noqa: BLE001 -- any failure of the built student is the derivation's
        raise DerivationError(
            f"cannot derive a student from {_describe(teacher)}: the student built at the derived widths fails on a "
            f"{size}x{size} image ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    finally:
        teacher.train(was[0]), student.train(was[1])
    shapes = [tuple(t.shape) for t in (want, got)] if all(isinstance(t, torch.Tensor) for t in (want, got)) else None
    if shapes is not None and shapes[0] != shapes[1]:
        raise DerivationError(
            f"cannot derive a student from {_describe(teacher)}: the student's output is {shapes[1]}, the teacher's {shapes[0]}"
        )


# A derived student holds about the weights the pruned teacher kept, so never more than its
# teacher; past this multiple of the teacher's parameters something upstream is wrong (a width
# rule fed degenerate masks), and building it would hand the allocator a size it cannot serve.
MAX_GROWTH = 2.0


def check_size(teacher: nn.Module, spec: dict[str, Any], round_to: int) -> None:
    """Refuse a rebuilt student larger than ``MAX_GROWTH`` x its teacher, sized on the meta
    device (shapes only) before anything is allocated."""
    from ptd.models import build_from_spec

    with torch.device("meta"), torch.random.fork_rng(devices=[]):
        n = sum(p.numel() for p in build_from_spec(spec).parameters())
    t = sum(p.numel() for p in teacher.parameters())
    if n > MAX_GROWTH * t:
        hint = f"lower student.round_to (now {round_to})" if round_to > 1 else "check the masks"
        raise DerivationError(f"the derived student would hold {n:,} parameters, {n / t:.3g}x its teacher's {t:,}: "
                              f"a student is never larger than its teacher; {hint}")


def derive_student(
    teacher: nn.Module,
    masks: Masks,
    *,
    inherit: bool = False,
    input_size: int | None = None,
    round_to: int = 1,
    round_narrower: bool = StudentConfig.round_narrower,
) -> tuple[nn.Module, StudentPlan]:
    """The student of a pruned teacher and the plan that sized it.

    Each Conv/Linear layer's width comes from its surviving weights by the rule
    (:mod:`ptd.students.width_rule`); layers whose channels are coupled share one width per group,
    and groups that feed each other in a cycle (a residual stage) are solved together at their
    teacher's proportions, directly (:mod:`ptd.students.solve`); the model's output layer keeps its
    class count. In ptd's ResNets and WRNs the stem keeps its width and stage 1 gets a 1x1
    projection where its width differs, as the paper's published ResNet students.

    * ptd's own families (VGG, ResNet, WRN, CIFAR ResNet, MobileNetV2) are **rebuilt** at the new
      widths: ``plan.spec`` is the family's plain-JSON spec.
    * Anything else (``tv:*`` models, a user's own ``nn.Module``) goes through **channel surgery**
      with Torch-Pruning (:mod:`ptd.students.surgery`); there a width is capped at the teacher's.
      ``plan.spec`` is the teacher's spec plus ``channel_widths`` (and ``trace_size``), which
      :func:`ptd.models.build_from_spec` replays. A user's module has no spec to build its
      architecture from, so ``spec["arch"]`` is None: rebuild it by constructing the teacher's
      architecture yourself and calling ``ptd.students.apply_widths(model, spec["channel_widths"],
      spec["trace_size"])`` before loading the student's weights.

    Weights start fresh (as in the paper) unless ``inherit``: then each group keeps the channels
    with the largest L1 norm of the pruned teacher's weights, with their weights.
    ``round_to``: make each free width the weight-nearest multiple of this (1, the default: the
    paper's rule exactly; ``ptd run``'s default, "auto", is :func:`derive_configured`'s).
    ``round_narrower`` (default: ``student.round_narrower``'s, true): where that multiple is the
    teacher's own width, take the multiple below instead of keeping the exact width
    (:func:`ptd.students.solve.solve`); no effect at ``round_to`` 1.
    ``input_size``: side of the square image used to trace the model (default: 32, else 64, else
    224 -- the first on which the forward pass runs).
    """
    teacher, graph, rebuild = _channel_graph(teacher, masks, input_size)
    sol = solve(graph, clamp=rebuild is None, round_to=round_to, round_narrower=round_narrower)
    return _build(teacher, masks, graph, rebuild, sol, inherit=inherit, round_to=round_to)


def _channel_graph(teacher: nn.Module, masks: Masks, input_size: int | None):
    """The unwrapped teacher, its channel graph (stem pinned where its family's rebuild adds a
    projection) and its family's spec builder (None: channel surgery). Solving does not change
    the graph, so one graph serves every ``round_to`` candidate."""
    if not isinstance(teacher, nn.Module):
        raise DerivationError(f"cannot derive a student from {type(teacher).__name__}: it is not an nn.Module")
    teacher = unwrap(teacher)
    check_masks(teacher, masks)
    graph, _ = extract(teacher, masks, input_size)
    rebuild = spec_builder(teacher)
    pin = stem_pin(teacher)
    if rebuild is not None and pin is not None:
        pin_layer(graph, pin[0], "stem keeps its width (the paper's ResNet students; stage 1 gets a 1x1 projection)", pin[1])
    return teacher, graph, rebuild


def _build(teacher: nn.Module, masks: Masks, graph, rebuild, sol, *, inherit: bool, round_to: int) -> tuple[nn.Module, StudentPlan]:
    """The student the solution ``sol`` sizes, and its plan."""
    members = graph.members
    widths = {n: sol.widths[m.group] for n, m in members.items()}
    changed = {n: w for n, w in widths.items() if w != members[n].teacher_out}
    group_members = [g.members for g in graph.groups]
    try:
        param = next(teacher.parameters())
        device, dtype = param.device, param.dtype
    except StopIteration:  # pragma: no cover - a model with convs has parameters
        device, dtype = torch.device("cpu"), torch.float32

    from ptd.models import build_from_spec

    if rebuild is not None:
        method = "rebuild"
        spec: dict[str, Any] = rebuild(teacher, widths)
        check_size(teacher, spec, round_to)
        student = build_from_spec(spec)
        check_widths(student, widths)
        student.to(device=device, dtype=dtype)
        if inherit:
            capped = [min(sol.widths[g.index], g.teacher_width) for g in graph.groups]
            keep = l1_keep(teacher, group_members, capped, masks)
            donor = copy.deepcopy(teacher)
            apply_widths(donor, {n: min(w, members[n].teacher_out) for n, w in changed.items()}, graph.input_size, keep)
            copy_overlap(donor, student)
    else:
        method = "surgery"
        base = getattr(teacher, "ptd_spec", None)
        if isinstance(base, dict) and base.get("arch"):
            cw = dict(base.get("channel_widths") or {})
            cw.update(changed)
            spec = {**base, "channel_widths": cw, "trace_size": graph.input_size}
        else:
            cw = dict(changed)
            spec = {
                "arch": None,
                "module_class": f"{type(teacher).__module__}.{type(teacher).__qualname__}",
                "channel_widths": cw,
                "trace_size": graph.input_size,
            }
        if inherit or spec["arch"] is None:
            student = copy.deepcopy(teacher)
            keep = l1_keep(teacher, group_members, [sol.widths[g.index] for g in graph.groups], masks) if inherit else None
            apply_widths(student, changed, graph.input_size, keep)
            if not inherit:
                _reinit(student)
        else:
            student = build_from_spec(spec)
            student.to(device=device, dtype=dtype)
        check_widths(student, widths)
        student.ptd_spec = spec

    check_runs(teacher, student, graph.input_size)
    student.train(teacher.training)
    student.requires_grad_(True)  # a student is there to be trained, even if its teacher was frozen
    plan = StudentPlan(
        spec=spec,
        layers=sol.rows,
        overrides=sol.overrides,
        groups=sol.groups,
        method=method,
        inherit=inherit,
        rule=RULE,
        round_to=round_to,
    )
    return student, plan


# student.round_to: auto -- per device type, the multiples measured to pay (docs/students.md,
# "Measured: are derived students fast?"), coarsest first. A coarser multiple moves the student
# further from the surviving weights: it is taken only while the student stays within
# AUTO_TOLERANCE of them (the rule's own promise), else the next (the demo's IMP-pruned teacher
# holds 0.85x at 32n and takes 8n).
# - CUDA (H200, bf16 and fp32, inference at batch 1,024, ResNet-18 @0.59/0.79): 32n students ran
#   1.28-1.39x faster than their teachers, 8n 0.93-1.16x: cuDNN runs 64-, 96- and 128-channel
#   convs at 260-470 TFLOP/s and 40-88 at 86-209.
# - CPU: 8 (with round_narrower) met the most targets. 16 was tried as a first candidate and
#   not taken: on the demo (AMD EPYC) its student was 2% faster than 8n's, both meeting the speed
#   targets, and its narrower step (26 -> 16 where the rule asked 26 of a 32-wide layer) left the
#   student 0.27 points worse alone and 0.15 with KD over 5 seeds (neither interval excludes 0;
#   benchmarks/results/round16_demo.md).
# - Last, 1 (the rule's exact widths) on every device: a net so narrow that rounding to 8 moves it
#   past 10% (the tests' 16-32-channel VGG held 0.79x at 8n) gets the student the rule promises,
#   not a faster but smaller one. No measured model reached it (the demo, ResNet-18, every
#   derivable torchvision model stay within 10% at 8n).
AUTO_ROUND_TO = {"cuda": (32, 8, 1)}
AUTO_ROUND_TO_DEFAULT = (8, 1)
AUTO_TOLERANCE = 0.10


def round_to_candidates(round_to: int | str, device_type: str) -> tuple[int, ...]:
    """The multiples ``derive_configured`` tries, in order: ``round_to`` itself, or for "auto"
    the device type's measured ones."""
    if round_to == "auto":
        return AUTO_ROUND_TO.get(device_type, AUTO_ROUND_TO_DEFAULT)
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be an integer >= 1 or 'auto', got {round_to!r}")
    return (round_to,)


def weights_over_surviving(student: nn.Module, masks: Masks) -> float:
    """The student's Conv/Linear weights over the pruned teacher's surviving ones (the rule keeps
    this near 1)."""
    alive = sum(int(m.sum()) for m in masks.values())
    held = sum(m.weight.numel() for m in student.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    return held / max(1, alive)


def derive_configured(teacher: nn.Module, masks: Masks, *, inherit: bool = StudentConfig.inherit,
                      round_to: int | str = StudentConfig.round_to, round_narrower: bool = StudentConfig.round_narrower,
                      device_type: str = "cpu") -> tuple[nn.Module, StudentPlan]:
    """:func:`derive_student` as a run's ``student`` config asks, on ``device_type`` ("cpu",
    "cuda"): with ``round_to`` "auto", the coarsest of the device's measured multiples whose
    student holds within ``AUTO_TOLERANCE`` of the surviving weights (else the finest); the plan
    records the multiple taken and, for "auto", why."""
    cands = round_to_candidates(round_to, device_type)
    t, graph, rebuild = _channel_graph(teacher, masks, None)
    alive = sum(int(m.sum()) for m in masks.values())
    tried = []
    for i, r in enumerate(cands):
        # Each candidate is only solved (milliseconds); the student is built once, for the one
        # taken (tracing and surgery cost seconds on a large torchvision teacher). A solution's
        # weights are those of the teacher's Conv/Linear layers at the new widths: a rebuilt
        # ResNet's added stage-1 projection is not among them (under 0.1% of the student, measured
        # on ResNet-18 at 0.59).
        sol = solve(graph, clamp=rebuild is None, round_to=r, round_narrower=round_narrower)
        ratio = sum(row.student_weights for row in sol.rows) / max(1, alive)
        tried.append(f"{r}{'n' if round_narrower else ''} holds {ratio:.3f}x the surviving weights")
        if abs(ratio - 1) <= AUTO_TOLERANCE or i == len(cands) - 1:
            student, plan = _build(t, masks, graph, rebuild, sol, inherit=inherit, round_to=r)
            if round_to == "auto":
                within = "within" if abs(ratio - 1) <= AUTO_TOLERANCE else "outside"
                plan.round_to_choice = (f"auto on {device_type}: {r} ({'; '.join(tried)}; {within} "
                                        f"{AUTO_TOLERANCE:.0%}); candidates {', '.join(map(str, cands))}")
            return student, plan
    raise AssertionError("unreachable: the last candidate is always taken")  # pragma: no cover
