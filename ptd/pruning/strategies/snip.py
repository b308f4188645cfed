"""SNIP (Lee et al. 2019): prune by connection sensitivity |g ⊙ w| in one shot, then retrain once.

g is the mean loss gradient over ``batches`` training batches (``ctx.batches``), taken on the
trained teacher in eval mode. Global ranking: exactly round(total * (1 - target)) weights survive.
One level, retrained with ``prune.retrain``.

Options: ``batches`` (int >= 1, default 10): how many training batches the gradient averages.
Resume note: ``ctx.batches(n)`` must give the same batches on a re-run for an interrupted
retraining to resume with the same masks.
"""
from __future__ import annotations

from dataclasses import dataclass

from ptd.pruning.base import Level, PruneContext, prune_once, register_strategy
from ptd.pruning.scores import snip as snip_scores
from ptd.pruning.select import global_topk, keep_for_target

# SNIP's paper scores on one batch, ptd's default on 10. The batches come from one epoch of the
# retraining loader (ptd.pipeline), so a count past an epoch is cut short silently: 10,000 is more
# than an epoch of every built-in dataset at batch 16 (Tiny-ImageNet: 6,250).
MAX_BATCHES = 10_000


@dataclass(frozen=True)
class Options:
    batches: int = 10  # training batches the gradient averages over

    def __post_init__(self) -> None:
        if self.batches < 1:
            raise ValueError(f"batches: {self.batches!r} must be >= 1")
        if self.batches > MAX_BATCHES:
            raise ValueError(f"batches: {self.batches!r} must be at most {MAX_BATCHES:,} (a count past one training epoch is cut short)")


def snip(ctx: PruneContext) -> list[Level]:
    n = ctx.options.batches

    def select():
        scores = snip_scores(ctx.model, ctx.masks, ctx.batches(n))
        return global_topk(scores, ctx.masks, keep_for_target(ctx.masks, ctx.cfg.target_sparsity))

    return prune_once(ctx, "snip", select)


register_strategy("snip", snip, Options)
