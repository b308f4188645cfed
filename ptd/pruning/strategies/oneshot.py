"""One-shot magnitude pruning: cut straight to the target by |w|, then retrain once.

- "oneshot": global ranking over every prunable layer; exactly round(total * (1 - target))
  weights survive.
- "oneshot_layerwise": every layer keeps round(layer size * (1 - target)) of its weights (within
  one weight per layer of the target).

One level (index 1), retrained with ``prune.retrain``. No options. The cheapest magnitude
baseline: one retraining instead of IMP's n.
"""
from __future__ import annotations

from ptd.pruning.base import Level, PruneContext, prune_once, register_strategy
from ptd.pruning.scores import magnitude
from ptd.pruning.select import global_topk, keep_for_target, layerwise_topk


def oneshot(ctx: PruneContext) -> list[Level]:
    return prune_once(ctx, "oneshot", lambda: global_topk(magnitude(ctx.model, ctx.masks), ctx.masks, keep_for_target(ctx.masks, ctx.cfg.target_sparsity)))


def oneshot_layerwise(ctx: PruneContext) -> list[Level]:
    return prune_once(ctx, "oneshot_layerwise", lambda: layerwise_topk(magnitude(ctx.model, ctx.masks), ctx.masks, 1.0 - ctx.cfg.target_sparsity))


register_strategy("oneshot", oneshot)
register_strategy("oneshot_layerwise", oneshot_layerwise)
