"""Iterative magnitude pruning (IMP), the paper's default.

Each round removes ``rate`` (20%) of the weights still alive, by global |w| over every prunable
layer, then retrains. The number of rounds is the n whose 1 - (1 - rate)^n is closest to the target
sparsity. Retraining variants (``prune.options.rewind``):
- "lr" (default, learning-rate rewinding): keep the weights, restart the full LR schedule;
- "weight": reset surviving weights to the teacher's weights at epoch ``rewind_epoch`` (saved by the
  teacher stage, see ``ptd.pruning.rewind``), then retrain with the full schedule;
- "finetune": keep the weights, retrain at a small constant LR (``finetune_lr``, default 1e-3).

Registered as "imp" (all options) and the aliases "imp_weight_rewind" / "imp_finetune" (rewind
fixed; the option then is not accepted).
"""
from __future__ import annotations

from dataclasses import replace

from ptd.config import ConfigError
from ptd.pruning.base import STRATEGIES, Level, PruneContext, level_metrics
from ptd.pruning.masks import apply_masks, count, unwrap
from ptd.pruning.scores import magnitude
from ptd.pruning.select import global_topk, rounds_for_target, survivors_after_round

OPTIONS = ("rewind", "rewind_epoch", "finetune_lr")
REWINDS = ("lr", "weight", "finetune")


def imp(ctx: PruneContext, *, rewind: str | None = None, name: str = "imp") -> list[Level]:
    if rewind is None:
        ctx.check_options(name, OPTIONS)
        rewind = ctx.option("rewind", "lr")
    else:
        ctx.check_options(name, {"weight": ("rewind_epoch",), "finetune": ("finetune_lr",), "lr": ()}[rewind])
    if rewind not in REWINDS:
        raise ConfigError(f"prune.options.rewind: {rewind!r} is not one of {', '.join(REWINDS)}")
    ctx.require_prunable()
    cfg = ctx.cfg
    retrain = cfg.retrain
    if rewind == "finetune":
        lr = ctx.option("finetune_lr", 1e-3)
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0:
            raise ConfigError(f"prune.options.finetune_lr: {lr!r} must be a number > 0")
        retrain = replace(retrain, lr=float(lr), milestones=())
    early = None
    if rewind == "weight":
        from ptd.pruning.rewind import rewind_epoch

        rewind_epoch(ctx)  # fail fast on a missing option, before any level runs

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
        if rewind == "weight":
            if early is None:  # read lazily: a fully resumed run needs no rewind file
                from ptd.pruning.rewind import rewind_state

                early = rewind_state(ctx)
            unwrap(model).load_state_dict(early)
        apply_masks(model, masks)
        trained = ctx.train(model, masks, f"level_{k}", retrain, ())
        apply_masks(model, masks)
        level = Level(k, masks, level_metrics(name, masks, trained, round=k, rewind=rewind))
        ctx.save_level(level)
        levels.append(level)
        ctx.log(f"prune level {k}: sparsity {level.sparsity:.4f}, val acc {trained.get('val_acc', float('nan'))}")
    return levels


def imp_weight_rewind(ctx: PruneContext) -> list[Level]:
    """IMP with weight rewinding to the teacher's epoch-``rewind_epoch`` weights."""
    return imp(ctx, rewind="weight", name="imp_weight_rewind")


def imp_finetune(ctx: PruneContext) -> list[Level]:
    """IMP with fine-tuning at a small constant LR (``finetune_lr``) after each round."""
    return imp(ctx, rewind="finetune", name="imp_finetune")


STRATEGIES.add("imp", imp)
STRATEGIES.add("imp_weight_rewind", imp_weight_rewind)
STRATEGIES.add("imp_finetune", imp_finetune)
