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

import torch

from ptd.pruning.base import STRATEGIES, Level, PruneContext, prune_once
from ptd.pruning.scores import random_scores
from ptd.pruning.select import global_topk, keep_for_target, layerwise_topk

OPTIONS = ("layerwise", "seed")


def random_prune(ctx: PruneContext) -> list[Level]:
    ctx.check_options("random", OPTIONS)
    layerwise = ctx.bool_option("layerwise", False)
    seed = ctx.int_option("seed", 0)

    def select():
        scores = random_scores(ctx.masks, torch.Generator().manual_seed(seed))
        if layerwise:
            return layerwise_topk(scores, ctx.masks, 1.0 - ctx.cfg.target_sparsity)
        return global_topk(scores, ctx.masks, keep_for_target(ctx.masks, ctx.cfg.target_sparsity))

    return prune_once(ctx, "random", select)


STRATEGIES.add("random", random_prune)
