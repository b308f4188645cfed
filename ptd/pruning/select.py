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


def keep_for_target(masks: Masks, target: float) -> int:
    """Weights to keep so that exactly ``target`` of all masked weights are pruned: round(total * (1 - target)).

    Never more than are alive now (masks a library caller passes may already be sparser than the target).
    """
    alive = sum(int(m.sum()) for m in masks.values())
    return min(alive, keep_of_total(sum(m.numel() for m in masks.values()), target))


def keep_of_total(total: int, target: float) -> int:
    """round(total * (1 - target)): the weights a ``target`` sparsity keeps of ``total``, all alive."""
    if not 0.0 <= target < 1.0:
        raise ValueError(f"target sparsity {target} is outside [0, 1)")
    return int(round(total * (1.0 - target)))


def global_topk(scores: dict[str, torch.Tensor], current: Masks, keep: int) -> Masks:
    """Keep the ``keep`` highest-scoring weights among those alive in ``current``, over all layers.

    Exact: exactly ``keep`` weights survive (ties broken by position, deterministically: the
    earlier layer in ``current``'s order, then the lower flat index, wins). Only alive weights
    are ranked, so dead weights never come back whatever their score; NaN scores rank last.
    float64 scores are ranked in float64 (SynFlow's scores span many decades).
    """
    names = list(current)
    alive = int(sum(int(torch.count_nonzero(current[n])) for n in names))
    if not 0 <= keep <= alive:
        raise ValueError(f"cannot keep {keep} weights: {alive} are alive")
    dtype = torch.float64 if any(scores[n].dtype == torch.float64 for n in names) else torch.float32
    dev = current[names[0]].device if names else torch.device("cpu")
    flat_alive = torch.cat([current[n].detach().flatten().to(dev) for n in names]) if names else torch.zeros(0, dtype=torch.bool)
    new_flat = torch.zeros_like(flat_alive)
    if keep == alive:
        new_flat = flat_alive.clone()
    elif keep:
        flat = torch.cat([scores[n].detach().to(device=dev, dtype=dtype).flatten() for n in names])
        if alive == flat_alive.numel():
            # All alive (the first round): the index list and the gather would copy every score
            # once more for nothing (8 GB and ~20 s at regnet_y_128gf's 637M weights).
            idx, s = None, torch.nan_to_num(flat, nan=-math.inf)
        else:
            idx = flat_alive.nonzero().squeeze(1)
            s = torch.nan_to_num(flat[idx], nan=-math.inf)
        # The same survivors as a stable descending sort, in O(n): everything above the keep-th
        # largest score, then the earliest positions among the scores equal to it.
        thr = torch.kthvalue(s.cpu() if dev.type == "mps" else s, alive - keep + 1).values.to(dev)
        above = s > thr
        need = keep - int(torch.count_nonzero(above))
        ties = (s == thr).nonzero().squeeze(1)[:need]
        chosen = above.clone()
        chosen[ties] = True
        new_flat[chosen if idx is None else idx[chosen]] = True
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
