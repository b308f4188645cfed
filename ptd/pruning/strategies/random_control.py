"""Random pruning: the control every scored strategy should beat.

Masks are drawn uniformly at random among the alive weights, then the network is retrained once
with ``prune.retrain`` (one level).

Options:
- ``layerwise`` (bool, default false): false = one global draw of exactly
  round(total * (1 - target)) survivors (each layer then keeps (1 - target) of its weights in
  expectation); true = every layer keeps round(layer size * (1 - target)).
- ``seed`` (int, default 0): the draw's seed; the same seed gives the same masks, which is what
  lets an interrupted retraining resume.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ptd.pruning.base import Level, PruneContext, prune_once, register_strategy
from ptd.pruning.scores import random_scores
from ptd.pruning.select import global_topk, keep_for_target, layerwise_topk
from ptd.seeding import MAX_SEED


@dataclass(frozen=True)
class Options:
    layerwise: bool = False  # every layer keeps (1 - target) of its weights, instead of one global draw
    seed: int = 0  # the draw's seed: the same masks again on resume

    def __post_init__(self) -> None:
        if not 0 <= self.seed <= MAX_SEED:  # checked with the config: torch's manual_seed overflowed after the teacher trained
            raise ValueError(f"seed: {self.seed!r} must be in 0..{MAX_SEED} (2**32 - 1, the largest seed every consumer in ptd takes)")


def random_prune(ctx: PruneContext) -> list[Level]:
    layerwise, seed = ctx.options.layerwise, ctx.options.seed

    def select():
        scores = random_scores(ctx.masks, torch.Generator().manual_seed(seed))
        if layerwise:
            return layerwise_topk(scores, ctx.masks, 1.0 - ctx.cfg.target_sparsity)
        return global_topk(scores, ctx.masks, keep_for_target(ctx.masks, ctx.cfg.target_sparsity))

    return prune_once(ctx, "random", select)


register_strategy("random", random_prune, Options)
