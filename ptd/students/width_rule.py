"""The student-width rule (Park & No, ECCV 2022, section 3) and its extension to coupled groups.

Per layer: ``c_l = max(1, round(nnz_l / (k_l * c_{l-1})))`` where ``nnz_l`` is the number of
weights of the teacher's l-th conv that survived pruning, ``k_l`` the kernel area (k*k) and
``c_{l-1}`` the width of the layer's input **in the student** (``c_0`` = input channels). A dense
student layer of that width then holds as many weights as the pruned teacher layer kept.

Which ``c_{l-1}``: the student's. Checked against the published VGG19 plans (PAPER.md):

* the rule must be a fixed point of the published plans -- feeding it
  ``nnz_l = k * s_{l-1} * s_l`` built from a published plan ``s`` gives ``s`` back exactly under
  the student reading, and not under the teacher reading (which would give
  ``s_{l-1} * s_l / t_{l-1}``, e.g. 45 instead of 61 for st36's second layer);
* the published plans' conv-weight share (0.638 / 0.407 / 0.207 of VGG19's) matches the teachers'
  densities (0.640 / 0.410 / 0.210) only under the student reading; dividing by the teacher's
  ``c_{l-1}`` instead would mean the teachers had kept 78% / 61% / 40% of their weights.

Rounding is half-up in exact integer arithmetic (Python's ``round`` would round half to even),
so the rule is reproducible on every platform.
"""
from __future__ import annotations

from fractions import Fraction
from typing import Sequence, Union

KernelSize = Union[int, Sequence[int]]


def round_half_up(x: Fraction) -> int:
    """Nearest integer to a non-negative rational, halves going up."""
    return int((2 * x.numerator + x.denominator) // (2 * x.denominator))


def conv_width(nnz: int, kernel_area: int, in_width: int) -> int:
    """Width of a dense layer whose ``kernel_area * in_width`` weights per output channel add up to ``nnz``.

    ``max(1, round(nnz / (kernel_area * in_width)))``; a layer keeps at least one channel.
    """
    if nnz < 0 or kernel_area < 1 or in_width < 1:
        raise ValueError(f"conv_width needs nnz >= 0, kernel_area >= 1, in_width >= 1; got {nnz}, {kernel_area}, {in_width}")
    return max(1, round_half_up(Fraction(int(nnz), int(kernel_area) * int(in_width))))


def group_width(nnz: Sequence[int], fan_in: Sequence[int]) -> int:
    """One width for layers that must share it (joined by a residual add, a depthwise conv and its producer, ...).

    The rule extended to a group: the width at which the group's dense members together hold as
    many weights as the pruned group kept, ``round(sum(nnz_m) / sum(fan_in_m))`` with ``fan_in_m``
    the weights per output channel of member m in the student (``k_m * c_in_m / groups_m``). It is
    the members' own estimates averaged with weights ``fan_in_m``, so a big layer counts for more
    than a 1x1 shortcut, and the student's total conv-weight count tracks the pruned teacher's.
    For a one-member group it is exactly :func:`conv_width`.
    """
    if len(nnz) != len(fan_in) or not nnz:
        raise ValueError("group_width needs one fan-in per member and at least one member")
    den = sum(int(f) for f in fan_in)
    if den < 1:
        raise ValueError("group_width: members have no fan-in")
    return max(1, round_half_up(Fraction(sum(int(n) for n in nnz), den)))


def kernel_area(k: KernelSize) -> int:
    if isinstance(k, int):
        return k * k
    area = 1
    for s in k:
        area *= int(s)
    return area


def vgg_widths(nnz_per_conv: Sequence[int], kernel_sizes: KernelSize | Sequence[KernelSize], in_channels: int) -> list[int]:
    """Apply the rule layer by layer down a plain conv stack, each layer dividing by the student's previous width.

    ``kernel_sizes``: one kernel side for all layers (3), or one per layer (an int side or a
    (kh, kw) pair).
    """
    n = len(nnz_per_conv)
    if isinstance(kernel_sizes, int):
        areas = [kernel_area(kernel_sizes)] * n
    else:
        ks = list(kernel_sizes)  # type: ignore[arg-type]
        if len(ks) != n:
            raise ValueError(f"{len(ks)} kernel sizes for {n} conv layers")
        areas = [kernel_area(k) for k in ks]
    widths: list[int] = []
    prev = int(in_channels)
    for nnz, area in zip(nnz_per_conv, areas):
        prev = conv_width(int(nnz), area, prev)
        widths.append(prev)
    return widths
