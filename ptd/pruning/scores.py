"""Importance scores: ``dict[param name -> tensor]`` shaped like the weights; higher = keep.

Kept apart from schedules so any strategy can use any score.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ptd.pruning.masks import Masks, unwrap
from ptd.train.distributed import all_sum_


@torch.no_grad()
def magnitude(model: nn.Module, masks: Masks) -> dict[str, torch.Tensor]:
    """|w| (L1 magnitude), the paper's score."""
    params = dict(unwrap(model).named_parameters())
    return {n: params[n].detach().abs().float() for n in masks}


def random_scores(masks: Masks, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """score_i ~ U[0, 1), i.i.d. per weight from ``generator`` (a CPU generator).

    Keeping the top k of these is a uniformly random k-subset of the alive weights: the random
    control. The same generator seed gives the same masks, so a resumed run prunes identically.
    """
    return {n: torch.rand(m.shape, generator=generator, dtype=torch.float64).to(m.device) for n, m in masks.items()}


def snip(
    model: nn.Module,
    masks: Masks,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> dict[str, torch.Tensor]:
    """SNIP connection sensitivity (Lee et al. 2019): score = |g ⊙ w|, g = (1/B) Σ_b ∂L(f(x_b), y_b)/∂w.

    L is ``loss(logits, y)``; the mean gradient over the given batches is taken before the
    product with the (masked) weight, as SNIP's derivative w.r.t. a connection gate c at c = 1
    is ∂L/∂c = g ⊙ w. The network runs in eval mode (BatchNorm uses its running statistics, so
    scoring has no side effects); no ``.grad`` is left on the model.

    Under DDP every rank passes batches of its own shard, and g is the mean over ALL ranks'
    batches (gradient sums and batch counts summed over ranks, then divided): the scores are
    those of one process given every rank's batches, the same on every rank. Averaging the ranks'
    scores instead would give mean_r |g_r ⊙ w|, which is not SNIP of the global batch (signs
    cancel in g, not in |g|). Every rank must call it (one all-reduce of the weights' size).
    """
    net = unwrap(model)
    if not batches:
        raise ValueError("snip needs at least one batch")
    params = dict(net.named_parameters())
    names = list(masks)
    ws = [params[n] for n in names]
    was_training = net.training
    net.eval()
    grads = [torch.zeros_like(w, dtype=torch.float32) for w in ws]
    try:
        with torch.enable_grad():
            for b in batches:  # (x, y) or (x, y, index)
                x, y = b[0], b[1]
                out = loss(net(x), y)
                for acc, g in zip(grads, torch.autograd.grad(out, ws)):
                    acc += g.float()
    finally:
        net.train(was_training)
    # float32 is exact for the count (a rank scores at most ptd.pruning.strategies.snip.MAX_BATCHES)
    # and rides in the gradients' all-reduce.
    n_batches = torch.tensor([float(len(batches))], device=grads[0].device if grads else None)
    all_sum_([*grads, n_batches])
    # Divided by a Python number, as before the reduction existed: CUDA multiplies by the
    # reciprocal of a scalar but divides by a tensor, one bit apart, which can flip near-tied masks.
    n = float(n_batches.item())
    return {n_: (g / n * w.detach().float() * masks[n_].to(w.device)).abs() for n_, g, w in zip(names, grads, ws)}


def synflow(model: nn.Module, masks: Masks, input_shape: Sequence[int]) -> dict[str, torch.Tensor]:
    """SynFlow (Tanaka et al. 2020): score = |∂R/∂θ ⊙ θ| with θ = |w| ⊙ mask and R = 1ᵀ f_θ(1).

    Data-free: every parameter and floating buffer is replaced by its absolute value (the
    "linearized" network; BatchNorm runs in eval mode on those |running stats|, as the SynFlow
    reference code does), the network is run on one all-ones input of shape ``input_shape`` (one
    sample, no batch dimension) and R is the sum of its output. Computed in float64 through
    ``torch.func.functional_call`` on detached copies, so the model's own weights are never
    modified (nothing to restore) and no ``.grad`` is left on it. Returns float64 scores.
    """
    net = unwrap(model)
    names = list(masks)
    prm = dict(net.named_parameters())
    dev = prm[names[0]].device if names else torch.device("cpu")
    state: dict[str, torch.Tensor] = {}
    for n, p in prm.items():
        state[n] = p.detach().abs().double()
    for n, b in net.named_buffers():
        state[n] = b.detach().abs().double() if b.is_floating_point() else b
    leaves = []
    for n in names:
        t = (state[n] * masks[n].to(device=dev, dtype=torch.float64)).requires_grad_(True)
        state[n] = t
        leaves.append(t)
    was_training = net.training
    net.eval()
    try:
        with torch.enable_grad():
            x = torch.ones((1, *input_shape), dtype=torch.float64, device=dev)
            r = torch.func.functional_call(net, state, (x,), strict=False).sum()
            grads = torch.autograd.grad(r, leaves)
    finally:
        net.train(was_training)
    return {n: (g * t).detach().abs() for n, g, t in zip(names, grads, leaves)}
