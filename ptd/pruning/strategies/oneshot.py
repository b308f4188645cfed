"""One-shot magnitude pruning: cut straight to the target by |w|, then retrain once.

- "oneshot": global ranking over every prunable layer; exactly round(total * (1 - target))
  weights survive.
- "oneshot_layerwise": every layer keeps round(layer size * (1 - target)) of its weights (within
  one weight per layer of the target).

One level (index 1), retrained with ``prune.retrain``. No options. The cheapest magnitude
baseline: one retraining instead of IMP's n.
"""
from __future__ import annotations

from ptd.pruning.base import STRATEGIES, Level, PruneContext, prune_once
from ptd.pruning.scores import magnitude
from ptd.pruning.select import global_topk, keep_for_target, layerwise_topk


def oneshot(ctx: PruneContext) -> list[Level]:
    ctx.check_options("oneshot", ())
    return prune_once(ctx, "oneshot", lambda: global_topk(magnitude(ctx.model, ctx.masks), ctx.masks, keep_for_target(ctx.masks, ctx.cfg.target_sparsity)))


def oneshot_layerwise(ctx: PruneContext) -> list[Level]:
    ctx.check_options("oneshot_layerwise", ())
    return prune_once(ctx, "oneshot_layerwise", lambda: layerwise_topk(magnitude(ctx.model, ctx.masks), ctx.masks, 1.0 - ctx.cfg.target_sparsity))


STRATEGIES.add("oneshot", oneshot)
STRATEGIES.add("oneshot_layerwise", oneshot_layerwise)
