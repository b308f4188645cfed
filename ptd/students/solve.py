"""Settle every coupled group's student width by the rule (see :mod:`ptd.students.width_rule`).

A layer's fan-in per output channel depends on the *student* width of the groups feeding it, and
in a residual net the group of a stage feeds its own members (the stream -> a block's first conv
-> the block's second conv -> back into the stream), so the widths are the fixed point of the
rule rather than one pass down the net. They are found by sweeping the groups in module order,
each recomputed from the current widths of its inputs, until a sweep changes nothing. On a plain
stack (VGG) the first sweep is exactly the layer-by-layer rule and the second confirms it.
Rounding can make two states alternate; the sweep stops at the first repeated state, so the
answer is deterministic either way.
"""
from __future__ import annotations

from dataclasses import dataclass

from ptd.students.graph import ChannelGraph, Group, Member
from ptd.students.plan import LayerRow
from ptd.students.width_rule import conv_width, group_width

MAX_SWEEPS = 100

RULE = (
    "layer: c = max(1, round(nnz / (k * c_in_student))); coupled group: c = round(sum nnz / sum fan_in_student), "
    "the width at which the dense group holds as many weights as the pruned group kept"
)


def in_width(m: Member, widths: list[int], groups: list[Group]) -> int:
    """Input channels of ``m`` in the student, given the current group widths."""
    w = m.teacher_in - sum(mult * (groups[g].teacher_width - widths[g]) for g, mult in m.inputs)
    return max(1, w)


def fan_in(m: Member, widths: list[int], groups: list[Group]) -> int:
    """Weights per output channel of the dense student layer."""
    if m.kind == "depthwise":
        return m.kernel_area
    return m.kernel_area * in_width(m, widths, groups)


def own_estimate(m: Member, widths: list[int], groups: list[Group]) -> int:
    if m.kind == "depthwise":
        return conv_width(m.nnz, m.kernel_area, 1)
    return conv_width(m.nnz, m.kernel_area, in_width(m, widths, groups))


@dataclass
class Solution:
    widths: list[int]
    rows: list[LayerRow]
    overrides: list[dict]
    groups: list[dict]
    sweeps: int


def round_up(w: int, multiple: int) -> int:
    return -(-w // multiple) * multiple


def solve(graph: ChannelGraph, clamp: bool = False, round_to: int = 1) -> Solution:
    """Group widths by the rule; ``clamp`` caps them at the teacher's (channel surgery cannot add channels).

    ``round_to`` > 1 rounds every free group's width up to a multiple of it (inside the fixed
    point, so the layers downstream see the rounded fan-in): CPU and GPU kernels run channel
    counts in blocks of 8 or 16, and an odd width pays for the whole block anyway.
    """
    if round_to < 1:
        raise ValueError(f"round_to must be >= 1, got {round_to}")
    groups, members = graph.groups, graph.members
    widths = [g.teacher_width for g in groups]
    seen = {tuple(widths)}
    sweeps = 0
    clamped: set[int] = set()
    for sweeps in range(1, MAX_SWEEPS + 1):
        for g in groups:
            if g.fixed:
                continue
            ms = [members[n] for n in g.members]
            w = round_up(group_width([m.nnz for m in ms], [fan_in(m, widths, groups) for m in ms]), round_to)
            if clamp and w > g.teacher_width:
                w = g.teacher_width
                clamped.add(g.index)
            else:
                clamped.discard(g.index)
            widths[g.index] = w
        state = tuple(widths)
        if state in seen:
            break
        seen.add(state)

    rows: list[LayerRow] = []
    overrides: list[dict] = []
    for m in members.values():
        g = groups[m.group]
        w = widths[g.index]
        est = own_estimate(m, widths, groups)
        note = ""
        if g.fixed:
            note = g.fixed
            est_out: int | None = None
        else:
            est_out = est
            if g.index in clamped:
                note = f"clamped to the teacher's width {g.teacher_width} (channel surgery cannot add channels)"
            elif len(g.members) > 1:
                note = f"coupled group of {len(g.members)}"
            if round_to > 1:
                note = (note + "; " if note else "") + f"rounded up to a multiple of {round_to}"
            if round_up(est, round_to) != w and len(g.members) > 1:
                overrides.append(
                    {
                        "layer": m.name,
                        "estimate": est,
                        "width": w,
                        "group": g.label,
                        "members": len(g.members),
                        "reason": "coupled layers share one width: the group's weight-matched width",
                    }
                )
            elif round_up(est, round_to) != w:
                overrides.append({"layer": m.name, "estimate": est, "width": w, "group": g.label, "members": 1, "reason": note})
        student_w = fan_in(m, widths, groups) * w
        rows.append(LayerRow(m.name, m.teacher_out, est_out, w, g.label, note, m.nnz, m.weights, student_w))

    group_rows = []
    for g in groups:
        ms = [members[n] for n in g.members]
        group_rows.append(
            {
                "group": g.label,
                "members": list(g.members),
                "teacher_width": g.teacher_width,
                "width": widths[g.index],
                "nnz": sum(m.nnz for m in ms),
                "student_weights": sum(fan_in(m, widths, groups) for m in ms) * widths[g.index],
                "fixed": g.fixed,
            }
        )
    return Solution(widths, rows, overrides, group_rows, sweeps)
