"""Settle every coupled group's student width by the rule (see :mod:`ptd.students.width_rule`), by a direct solve.

A layer's fan-in per output channel depends on the *student* width of the groups feeding it. Let
group g depend on group h when a member of g reads h's channels. In a plain stack (VGG) these
dependencies form a chain, and each group is solved once, in order, from the final widths of its
inputs: exactly the paper's layer-by-layer rule. In a residual net a stage's stream feeds its own
blocks, whose inner convs feed the stream again: those groups form a cycle (a strongly connected
component of the dependency graph), and their widths are only tied through products -- iterating
the rule there drifts to a different answer for every sweep count. So a cycle is solved as one
unknown:

* every free group g of the component gets ``w_g = round(a * t_g)`` (``t_g``: its teacher width)
  for one scale ``a``, so the component keeps its teacher's proportions (a basic-block stage: one
  width for the stream and the inner convs, as the paper's ResNet students; a bottleneck stage:
  inner convs a quarter of the stream, as the teacher);
* ``a`` is where the dense component holds as many weights as the pruned component kept:
  ``F(a) = sum_m fan_in_m(w) * w_{g(m)}`` is non-decreasing in ``a`` (each width is, and each
  fan-in is a non-decreasing function of the widths), so bisection over the integer width ``W``
  of the component's widest group (``a = W / t_max``) finds the smallest ``W`` with
  ``F >= sum nnz``; of it and ``W - 1`` the one nearer in weights wins (a tie goes up: half-up,
  as the layer rule). For a one-group component with no self-loop, ``F`` is linear in the width
  and this is exactly ``round(sum nnz / sum fan_in)``.

Components are solved in topological order of the condensed graph, each from the final widths of
the components it reads, so the answer does not depend on the order groups are listed in and
there is no iteration cap. ``round_to`` > 1 then moves every free group's width to the nearest
multiple of it (at least one multiple), after the solve: the student is the paper's student with
aligned widths -- except where that multiple would be the teacher's width (or more) for a group
the rule narrowed: that group takes the multiple below with ``round_narrower``, else the coarsest
of 32, 16 and 8 dividing ``round_to`` that applies, else keeps its exact width
(:func:`aligned_width`). (Rounding inside the solve, so that downstream layers re-balance the weights, was
tried first: on a plain stack each rounded-down layer makes the next one wider and the widths
alternate -- VGG11 went 12, 29, 39, 58 -> 8, 40, 24, 96.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ptd.config import StudentConfig
from ptd.students.graph import ChannelGraph, Group, Member
from ptd.students.plan import LayerRow
from ptd.students.width_rule import conv_width, round_half_up
from fractions import Fraction

RULE = (
    "layer: c = max(1, round(nnz / (k * c_in_student))); coupled group (and a cycle of groups, at its teacher's "
    "proportions): the width at which the dense group holds as many weights as the pruned group kept, solved directly"
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
    components: list[list[int]]  # group indices solved together, in the order they were solved


def round_to_multiple(w: int, multiple: int) -> int:
    """The nearest multiple of ``multiple`` to ``w`` (halves up), at least ``multiple``."""
    if multiple <= 1:
        return max(1, w)
    return max(multiple, round_half_up(Fraction(w, multiple)) * multiple)


# The channel blocks hardware kernels run in (oneDNN: 8 fp32 channels per AVX2 vector, 16 per
# AVX-512 one; cuDNN's fast tensor-core tiles at 32 and up). A group that round_to itself cannot
# serve falls back to the coarsest of these dividing round_to, so round_to 32 on a 16-wide layer
# the rule takes to 9 gives 8, not an unaligned 9.
FALLBACK_MULTIPLES = (32, 16, 8)


def aligned_width(w0: int, teacher_width: int, round_to: int, round_narrower: bool, clamp: bool) -> tuple[int, int]:
    """A free group's exact width ``w0`` moved to the nearest multiple of ``round_to``, and that
    multiple; where ``round_to`` cannot apply, of the coarsest ``FALLBACK_MULTIPLES`` dividing it
    that can; else ``(w0, 1)``. A multiple cannot apply where it would reach the teacher's width
    for a group the rule narrowed (all the narrowing the pruning earned undone: a 16-wide layer at
    13) or widen past the teacher a group that kept its width -- unless ``round_narrower``, where
    the multiple below is taken -- nor where it would multiply a width already past the teacher's
    (only the floor, the first multiple for ``w0`` < half of it, lands that far: 64 for a 20-wide
    group; 10**9 from a typo)."""
    for m in (round_to, *(f for f in FALLBACK_MULTIPLES if f < round_to and round_to % f == 0)):
        w = round_to_multiple(w0, m)
        if w0 <= teacher_width <= w and w != w0:
            # a student layer wider than its teacher's is never the faster one
            below = w0 // m * m
            if round_narrower and w0 < teacher_width and below >= m:
                return below, m
            continue
        if clamp:
            return min(w, teacher_width), m
        if w - w0 > m // 2:
            continue
        return w, m
    return w0, 1


def components(graph: ChannelGraph) -> list[list[int]]:
    """Strongly connected components of the group dependency graph, dependencies first.

    Deterministic whatever the order of ``graph.groups``: each component is sorted by the
    smallest module-order position of its members, and ties between independent components are
    broken the same way (the solution does not depend on it anyway: independent components do not
    read each other's widths).
    """
    groups, members = graph.groups, graph.members
    pos = {n: i for i, n in enumerate(members)}
    key = {g.index: min(pos[n] for n in g.members) for g in groups}
    deps: dict[int, set[int]] = {g.index: set() for g in groups}
    for m in members.values():
        for h, _ in m.inputs:
            deps[m.group].add(h)
    order = sorted(deps, key=lambda g: key[g])
    # Tarjan's algorithm, iterative (a ResNet-152 has hundreds of groups: no recursion limits).
    index: dict[int, int] = {}
    low: dict[int, int] = {}
    on_stack: set[int] = set()
    stack: list[int] = []
    out: list[list[int]] = []
    counter = 0
    for root in order:
        if root in index:
            continue
        work = [(root, iter(sorted(deps[root], key=lambda g: key[g])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(deps[w], key=lambda g: key[g]))))
                    advanced = True
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                out.append(sorted(comp, key=lambda g: key[g]))
    # Tarjan emits a component after everything it depends on: already a topological order.
    return out


def _feeder(ci: int, comps: list[list[int]], comp_of: dict[int, int], graph: ChannelGraph, held: dict[int, int]) -> int | None:
    """The component that should hold clamped component ``ci``'s weights: of those feeding it with a
    free group and not held themselves, the last solved (the nearest upstream); None if none."""
    groups, members = graph.groups, graph.members
    feeding = {comp_of[h] for g in comps[ci] for n in groups[g].members for h, _ in members[n].inputs}
    ok = [k for k in feeding if k != ci and k not in held and any(not groups[g].fixed for g in comps[k])]
    return max(ok) if ok else None


def _solve_component(comp: list[int], widths: list[int], graph: ChannelGraph, clamp: bool,
                     held: Sequence[Member] = ()) -> tuple[set[int], int, bool]:
    """Set ``widths`` for the free groups of ``comp``; returns (groups clamped at the teacher's width,
    bisection steps, whether even the teacher's widths hold fewer weights than were kept).

    ``held``: members of clamped components this one feeds, at their (fixed) teacher widths: their
    weights count in the target and in ``F``, so this component widens to hold what they cannot."""
    groups, members = graph.groups, graph.members
    free = [g for g in comp if not groups[g].fixed]
    if not free:
        return set(), 0, False
    ms = [members[n] for g in comp for n in groups[g].members] + list(held)
    target = sum(m.nnz for m in ms)
    t_max = max(groups[g].teacher_width for g in free)

    def assign(W: int) -> None:
        for g in free:
            t = groups[g].teacher_width
            w = max(1, round_half_up(Fraction(W * t, t_max)))
            if clamp:
                w = min(w, t)
            widths[g] = w

    def F(W: int) -> int:
        assign(W)
        return sum(fan_in(m, widths, groups) * widths[m.group] for m in ms)

    lo, hi = 1, t_max
    steps = 0
    if not clamp:  # a rebuilt student may be wider than its teacher: grow the bracket until it holds the target
        while F(hi) < target:
            lo, hi = hi, hi * 2
            steps += 1
    if F(hi) < target:  # clamped: even the teacher's width holds fewer weights than were kept upstream-adjusted
        assign(hi)
        return set(free), steps, True
    if F(lo) >= target:
        W = lo
    else:  # invariant: F(lo) < target <= F(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            steps += 1
            if F(mid) >= target:
                hi = mid
            else:
                lo = mid
        W = hi if (F(hi) - target) <= (target - F(lo)) else lo
    assign(W)
    clamped = {g for g in free if clamp and widths[g] == groups[g].teacher_width and round_half_up(Fraction(W * groups[g].teacher_width, t_max)) > groups[g].teacher_width}
    return clamped, steps, False


def solve(graph: ChannelGraph, clamp: bool = False, round_to: int = 1, round_narrower: bool = StudentConfig.round_narrower) -> Solution:
    """Group widths by the rule; ``clamp`` caps them at the teacher's (channel surgery cannot add channels).

    ``round_to`` > 1 moves every free group's width to the nearest multiple of it: CPU and GPU
    kernels run channel counts in blocks of 8 or 16, and an odd width pays for the whole block
    anyway. Where that multiple is the teacher's own width (a 16-wide layer the rule takes to 12),
    ``round_narrower`` takes the multiple below (if it is not 0): the exact width runs in the
    teacher's blocks (onnxruntime pads 12 channels to 16), so only the narrower multiple is faster
    (benchmarks/student_speed.py measures both). Else the coarsest of 32, 16, 8 dividing
    ``round_to`` that applies is taken, else the exact width (:func:`aligned_width`).
    """
    if round_to < 1:
        raise ValueError(f"round_to must be >= 1, got {round_to}")
    groups, members = graph.groups, graph.members
    comps = components(graph)
    comp_of = {g: i for i, comp in enumerate(comps) for g in comp}
    # Channel surgery cannot widen a layer past its teacher's: a component the rule wants wider
    # (alexnet's classifier.4 asks 6,573 of 4,096) is held at the teacher's widths, and the
    # component feeding it (the last one solved before it) widens to hold the weights it cannot,
    # so the student keeps the surviving weights in total. Each pass is the direct solve; a pass
    # can only add held components, so this ends within one pass per component.
    held: dict[int, int] = {}  # clamped component -> the component that holds its weights
    while True:
        widths = [g.teacher_width for g in groups]
        clamped: set[int] = set()
        short: set[int] = set()
        holds: dict[int, list[Member]] = {}
        for k, p in held.items():
            holds.setdefault(p, []).extend(members[n] for g in comps[k] for n in groups[g].members)
        for ci, comp in enumerate(comps):
            if ci in held:  # at the teacher's widths (set above); its weights count in its feeder's solve
                clamped |= {g for g in comp if not groups[g].fixed}
                continue
            c, _, lacking = _solve_component(comp, widths, graph, clamp, holds.get(ci, ()))
            clamped |= c
            if lacking:
                short.add(ci)
        new = {ci: f for ci in sorted(short) if (f := _feeder(ci, comps, comp_of, graph, held)) is not None}
        if not clamp or not new:
            break
        held.update(new)
    exact = list(widths)
    multiple = {g.index: 1 for g in groups}  # the multiple each group was rounded to (1: kept exact)
    if round_to > 1:
        for g in groups:
            if not g.fixed:
                widths[g.index], multiple[g.index] = aligned_width(widths[g.index], g.teacher_width, round_to, round_narrower, clamp)
    holder_of = {p: k for k, p in held.items()}

    rows: list[LayerRow] = []
    overrides: list[dict] = []
    for m in members.values():
        g = groups[m.group]
        w = widths[g.index]
        est = own_estimate(m, widths, groups)
        cyc = [x for x in comps[comp_of[g.index]] if not groups[x].fixed]
        note = ""
        if g.fixed:
            note = g.fixed
            est_out: int | None = None
        else:
            est_out = est
            if g.index in clamped:
                note = f"clamped to the teacher's width {g.teacher_width} (channel surgery cannot add channels)"
                if comp_of[g.index] in held:
                    note += "; the layers feeding it widen to hold its weights"
            elif comp_of[g.index] in holder_of:
                k = holder_of[comp_of[g.index]]
                note = f"widened to hold the weights of {groups[comps[k][0]].members[0]}, held at the teacher's width"
            elif len(cyc) > 1:
                note = f"cycle of {len(cyc)} groups solved together at the teacher's proportions"
            elif len(g.members) > 1:
                note = f"coupled group of {len(g.members)}"
            m_g = multiple[g.index]
            past = f"the nearest multiple of {round_to} is at or past the teacher's width"
            why = ""
            if round_to > 1 and w != exact[g.index]:
                why = (f"rounded to a multiple of {round_to}" if m_g == round_to else f"rounded to a multiple of {m_g}, not {round_to}: {past}")
                why += f" (exact rule: {exact[g.index]})"
            elif round_to > 1 and m_g < round_to:
                why = f"not rounded to {round_to}: {past}" + (f"; a multiple of {m_g} already" if m_g > 1 else "")
            if why:
                note = (note + "; " if note else "") + why
            if est != exact[g.index] and round_to_multiple(est, m_g) != w:
                reason = note
                if len(cyc) > 1:
                    reason = "layers of one residual cycle share one scale: the cycle's weight-matched width"
                elif len(g.members) > 1:
                    reason = "coupled layers share one width: the group's weight-matched width"
                overrides.append(
                    {"layer": m.name, "estimate": est, "width": w, "group": g.label, "members": len(g.members), "reason": reason}
                )
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
                "component": comp_of[g.index],
            }
        )
    return Solution(widths, rows, overrides, group_rows, comps)
