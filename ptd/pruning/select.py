"""From importance scores to masks: the selection half of pruning, separate from scores and schedules."""
from __future__ import annotations

import math

import torch

from ptd.pruning.masks import Masks


def rounds_for_target(target: float, rate: float = 0.2) -> int:
    """Number of rounds n whose cumulative sparsity 1 - (1 - rate)^n is closest to ``target``.

    0.36 -> 2, 0.59 -> 4, 0.79 -> 7 at rate 0.2 (the paper's levels). 0 -> 0.
    """
    if not 0.0 <= target < 1.0:
        raise ValueError(f"target sparsity {target} is outside [0, 1)")
    if not 0.0 < rate < 1.0:
        raise ValueError(f"pruning rate {rate} is outside (0, 1)")
    if target == 0.0:
        return 0
    # Search around the continuous solution; ties go to fewer rounds (less retraining).
    guess = math.log(1.0 - target) / math.log(1.0 - rate)
    cands = range(max(0, math.floor(guess) - 1), math.ceil(guess) + 2)
    return min(cands, key=lambda n: (abs(1.0 - (1.0 - rate) ** n - target), n))


def survivors_after_round(alive: int, rate: float) -> int:
    """Weights still alive after pruning ``rate`` of the ``alive`` ones (rounded to nearest)."""
    return int(round(alive * (1.0 - rate)))


def global_topk(scores: dict[str, torch.Tensor], current: Masks, keep: int) -> Masks:
    """Keep the ``keep`` highest-scoring weights among those alive in ``current``, over all layers.

    Exact: exactly ``keep`` weights survive (ties broken by position, deterministically).
    Dead weights never come back.
    """
    names = list(current)
    flat = torch.cat([torch.where(current[n], scores[n].float(), torch.tensor(-math.inf)).flatten().cpu() for n in names])
    alive = int(sum(int(current[n].sum()) for n in names))
    if not 0 <= keep <= alive:
        raise ValueError(f"cannot keep {keep} weights: {alive} are alive")
    new_flat = torch.zeros_like(flat, dtype=torch.bool)
    if keep:
        # Stable sort: equal scores keep their order, so the result is reproducible.
        order = torch.sort(flat, descending=True, stable=True).indices[:keep]
        new_flat[order] = True
    out: Masks = {}
    i = 0
    for n in names:
        k = current[n].numel()
        out[n] = new_flat[i : i + k].view_as(current[n]).to(current[n].device)
        i += k
    return out


def layerwise_topk(scores: dict[str, torch.Tensor], current: Masks, keep_fraction: float) -> Masks:
    """Keep round(keep_fraction * layer size) weights in every layer (never more than are alive)."""
    out: Masks = {}
    for n, m in current.items():
        keep = min(int(m.sum()), int(round(keep_fraction * m.numel())))
        out.update(global_topk({n: scores[n]}, {n: m}, keep))
    return out
