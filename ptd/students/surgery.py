"""Channel surgery with Torch-Pruning: make a model physically narrower, group by group.

The trap this module avoids: Torch-Pruning 1.6.1's pruners take one ratio per layer, but for a
coupled group they apply the *first* member's ratio to the whole group and keep
``int(C * (1 - ratio))`` channels -- other members' ratios are silently ignored and the result is
often one channel off the target. Here nothing goes through ratios: every group is pruned through
``DependencyGraph.get_pruning_group(layer, prune_out_channels, idxs)`` with the explicit list of
channel indices to drop, and every layer's width is checked after the surgery.

Which channels survive: the ``keep`` lists given (by L1 norm of the pruned teacher's weights when
a student inherits them), else the first ``w`` of each group -- that is what rebuilding a student
from its spec does, where only the shapes matter because the weights are loaded afterwards.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn as nn

from ptd.students.graph import (
    CONV_TYPES,
    LAYER_TYPES,
    DerivationError,
    build_dependency_graph,
    example_input,
    layer_out,
    out_channel_fn,
)


def apply_widths(
    model: nn.Module,
    channel_widths: Mapping[str, int],
    input_size: int = 32,
    keep: Mapping[str, Sequence[int]] | None = None,
) -> nn.Module:
    """Prune ``model`` in place so that each named Conv/Linear layer has the given out-width.

    ``channel_widths`` names every layer whose width changes (members of one coupled group must
    agree); ``keep[name]`` optionally lists which of that layer's channels survive. Returns the
    model. Raises ``DerivationError`` if a width cannot be reached.
    """
    named = dict(model.named_modules())
    for n, w in channel_widths.items():
        if n not in named or not isinstance(named[n], LAYER_TYPES):
            raise DerivationError(f"channel_widths names {n!r}, which is not a Conv/Linear layer of {type(model).__name__}")
        if not 1 <= int(w) <= layer_out(named[n]):
            raise DerivationError(f"cannot set {n} to {w} channels by surgery: it has {layer_out(named[n])} (surgery only removes channels)")
    was_training = model.training
    model.eval()
    try:
        dg = build_dependency_graph(model, example_input(model, input_size))
        from tqdm.auto import tqdm

        for n, w in tqdm(channel_widths.items(), desc="channel surgery", unit="layer", delay=3, leave=False):
            m = named[n]
            c = layer_out(m)
            w = int(w)
            if c == w:
                continue  # already there (another member of its group was pruned first)
            if keep is not None and n in keep:
                kept = sorted(int(i) for i in keep[n])
                if len(kept) != w or len(set(kept)) != w or not all(0 <= i < c for i in kept):
                    raise DerivationError(f"keep list for {n} must be {w} distinct channel indices below {c}")
            else:
                kept = list(range(w))
            kept_set = set(kept)
            drop = [i for i in range(c) if i not in kept_set]
            group = dg.get_pruning_group(m, out_channel_fn(dg, m), drop)
            group.prune()
    finally:
        model.train(was_training)
    check_widths(model, channel_widths)
    return model


def check_widths(model: nn.Module, channel_widths: Mapping[str, int]) -> None:
    named = dict(model.named_modules())
    wrong = {n: (layer_out(named[n]), int(w)) for n, w in channel_widths.items() if layer_out(named[n]) != int(w)}
    if wrong:
        detail = ", ".join(f"{n}: {got} (wanted {want})" for n, (got, want) in list(wrong.items())[:5])
        raise DerivationError(f"channel surgery missed target widths ({detail}); coupled layers must be given one width")
    for n, m in named.items():  # a depthwise conv must still be depthwise
        if isinstance(m, CONV_TYPES) and m.groups > 1 and not (m.groups == m.in_channels == m.out_channels):
            raise DerivationError(f"channel surgery left {n} with groups={m.groups}, in={m.in_channels}, out={m.out_channels}")


@torch.no_grad()
def l1_keep(model: nn.Module, groups: Sequence[Sequence[str]], widths: Sequence[int], masks: Mapping[str, torch.Tensor] | None = None) -> dict[str, list[int]]:
    """For each coupled group, the ``w`` channels with the largest L1 norm summed over its members' (masked) weights.

    Ties go to the lower index; the list is in ascending channel order. The same list is given
    to every member of the group.
    """
    named = dict(model.named_modules())
    keep: dict[str, list[int]] = {}
    for members, w in zip(groups, widths):
        score = None
        for n in members:
            weight = named[n].weight.detach()
            wname = f"{n}.weight" if n else "weight"
            if masks is not None and wname in masks:
                weight = weight * masks[wname].to(weight.device, weight.dtype)
            s = weight.abs().flatten(1).sum(1).float().cpu()
            score = s if score is None else score + s
        assert score is not None
        w = min(int(w), score.numel())
        order = torch.sort(-score, stable=True).indices[:w]
        kept = sorted(int(i) for i in order)
        for n in members:
            keep[n] = kept
    return keep


@torch.no_grad()
def copy_overlap(src: nn.Module, dst: nn.Module) -> int:
    """Copy every tensor of ``src``'s state into the same-named tensor of ``dst``, over the leading slice both have.

    Used to give a rebuilt student the channels it inherits: ``src`` is the teacher after surgery
    (same layer names, channel ``j`` = the ``j``-th kept channel); where the student is wider
    than the teacher (the rule can ask for that), the extra channels keep their fresh init.
    Returns the number of tensors copied.
    """
    s = src.state_dict()
    d = dst.state_dict()
    copied = 0
    for k, t in d.items():
        if k not in s or s[k].dim() != t.dim():
            continue
        sl = tuple(slice(0, min(a, b)) for a, b in zip(s[k].shape, t.shape))
        t[sl].copy_(s[k][sl].to(t.device, t.dtype))
        copied += 1
    return copied
