"""Iterative magnitude pruning (IMP), the paper's default.

Each round removes ``rate`` (20%) of the weights still alive, by global |w| over every prunable
layer, then retrains. The number of rounds is the n whose 1 - (1 - rate)^n is closest to the target
sparsity. Retraining variants (``prune.options.rewind``):
- "lr" (default, learning-rate rewinding): keep the weights, restart the full LR schedule;
- "weight": reset surviving weights to the teacher's weights at epoch ``rewind_epoch`` (saved by the
  teacher stage), then retrain with the full schedule;
- "finetune": keep the weights, retrain at a small constant LR (``finetune_lr``, default 1e-3).
"""
from __future__ import annotations

from dataclasses import replace

from ptd.pruning.base import STRATEGIES, Level, PruneContext
from ptd.pruning.masks import apply_masks, count
from ptd.pruning.scores import magnitude
from ptd.pruning.select import global_topk, rounds_for_target, survivors_after_round

OPTIONS = ("rewind", "rewind_epoch", "finetune_lr")


def imp(ctx: PruneContext, *, rewind: str | None = None) -> list[Level]:
    ctx.check_options("imp", OPTIONS)
    rewind = rewind or ctx.option("rewind", "lr")
    if rewind not in ("lr", "weight", "finetune"):
        from ptd.config import ConfigError

        raise ConfigError(f"prune.options.rewind: {rewind!r} is not one of lr, weight, finetune")
    cfg = ctx.cfg
    retrain = cfg.retrain
    if rewind == "finetune":
        retrain = replace(retrain, lr=float(ctx.option("finetune_lr", 1e-3)), milestones=())
    early = None
    if rewind == "weight":
        from ptd.pruning.rewind import rewind_state

        early = rewind_state(ctx)

    model, masks = ctx.model, ctx.masks
    levels: list[Level] = []
    for k in range(1, rounds_for_target(cfg.target_sparsity, cfg.rate) + 1):
        if ctx.level_done(k):
            level = ctx.load_level(k)
            masks = level.masks
            levels.append(level)
            continue
        alive, _ = count(masks)
        masks = global_topk(magnitude(model, masks), masks, survivors_after_round(alive, cfg.rate))
        if early is not None:
            model.load_state_dict(early)
        apply_masks(model, masks)
        metrics = ctx.train(model, masks, f"level_{k}", retrain, ())
        level = Level(k, masks, metrics)
        ctx.save_level(level)
        levels.append(level)
        ctx.log(f"prune level {k}: sparsity {level.sparsity:.4f}, val acc {metrics.get('val_acc', float('nan')):.4f}")
    return levels


STRATEGIES.add("imp", imp)
