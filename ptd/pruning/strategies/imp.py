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

from dataclasses import dataclass, replace
from typing import Any

from ptd.config import MAX_EPOCHS, ConfigError, OptimConfig
from ptd.pruning.base import Level, format_acc, PruneContext, level_metrics, register_strategy
from ptd.pruning.masks import apply_masks, count, unwrap
from ptd.pruning.scores import magnitude
from ptd.pruning.select import global_topk, rounds_for_target, survivors_after_round

REWINDS = ("lr", "weight", "finetune")


def _check_rewind_epoch(e: int | None) -> None:
    if e is not None and e < 0:
        raise ValueError(f"rewind_epoch: {e!r} must be >= 0")
    if e is not None and e > MAX_EPOCHS:  # ptd.preflight also holds it to teacher.optim.epochs
        raise ValueError(f"rewind_epoch: {e!r} must be at most {MAX_EPOCHS:,} (the most epochs a teacher trains)")


def _check_finetune_lr(lr: float) -> None:
    if lr <= 0:
        raise ValueError(f"finetune_lr: {lr!r} must be a number > 0")


@dataclass(frozen=True)
class Options:
    rewind: str = "lr"  # lr | weight | finetune (see the module docstring)
    rewind_epoch: int | None = None  # teacher epoch whose weights "weight" rewinds to
    finetune_lr: float = 1e-3  # constant learning rate of "finetune"

    def __post_init__(self) -> None:
        if self.rewind not in REWINDS:
            raise ValueError(f"rewind: {self.rewind!r} is not one of {', '.join(REWINDS)}")
        _check_rewind_epoch(self.rewind_epoch)
        _check_finetune_lr(self.finetune_lr)


@dataclass(frozen=True)
class WeightRewindOptions:
    rewind_epoch: int | None = None  # required: the teacher epoch whose weights survivors reset to

    def __post_init__(self) -> None:
        _check_rewind_epoch(self.rewind_epoch)


@dataclass(frozen=True)
class FinetuneOptions:
    finetune_lr: float = 1e-3

    def __post_init__(self) -> None:
        _check_finetune_lr(self.finetune_lr)


def imp(ctx: PruneContext, *, rewind: str | None = None, name: str = "imp") -> list[Level]:
    o = ctx.options
    rewind = rewind or o.rewind
    ctx.require_prunable()
    cfg = ctx.cfg
    retrain = _retrain_optim(cfg.retrain, o, rewind)
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
        ctx.log(f"prune level {k}: sparsity {level.sparsity:.4f}, val acc {format_acc(trained.get('val_acc'))}")
    return levels


def imp_weight_rewind(ctx: PruneContext) -> list[Level]:
    """IMP with weight rewinding to the teacher's epoch-``rewind_epoch`` weights."""
    return imp(ctx, rewind="weight", name="imp_weight_rewind")


def imp_finetune(ctx: PruneContext) -> list[Level]:
    """IMP with fine-tuning at a small constant LR (``finetune_lr``) after each round."""
    return imp(ctx, rewind="finetune", name="imp_finetune")


def _retrain_optim(retrain: OptimConfig, o: Any, rewind: str | None = None) -> OptimConfig:
    """Each round's optimizer: prune.retrain, restarted (lr, weight rewinding), or its constant
    ``finetune_lr`` without decay (finetune). The control teacher replays it (StrategySpec)."""
    if (rewind or getattr(o, "rewind", "lr")) == "finetune":
        return replace(retrain, lr=float(o.finetune_lr), milestones=())
    return retrain


def _snapshot(o) -> int | None:
    # The teacher stage keeps its weights at this epoch for weight rewinding (0: the init, saved
    # before its first epoch). Only when this run rewinds weights: imp's rewind_epoch under
    # rewind: lr is unused, and a sweep saved it, as if needed, in place of another strategy's.
    return getattr(o, "rewind_epoch", None) if getattr(o, "rewind", "weight") == "weight" else None


def _check_rewind(name: str, opts: dict, cfg) -> None:
    """Before the teacher trains: weight rewinding names an epoch the teacher will train through
    and save (0: its initialization, saved before its first epoch), and has a teacher to train."""
    weight = name == "imp_weight_rewind" or opts.get("rewind") == "weight"
    if weight and cfg.teacher.checkpoint:
        # First: no rewind_epoch helps a teacher that is not trained here, and asking for one led
        # the user from this refusal straight into the next (new-user audit).
        key, alt = (("prune.strategy", "prune.strategy: imp (learning-rate rewinding, the paper's)") if name == "imp_weight_rewind"
                    else ("prune.options.rewind", "rewind: lr"))
        raise ConfigError(f"{key}: {name if key == 'prune.strategy' else repr('weight')} rewinds the survivors to the teacher's early "
                          f"weights, but teacher.checkpoint ({cfg.teacher.checkpoint}) is loaded, not trained here, so it has "
                          f"none; use {alt}, or drop teacher.checkpoint to train the teacher")
    e = opts.get("rewind_epoch")
    if e is None:
        if weight:
            raise ConfigError(f"prune.options.rewind_epoch: required for weight rewinding ({name}); set it (e.g. 1) so the "
                              f"teacher stage saves its weights at that epoch, or use rewind: lr")
        return
    if isinstance(e, bool) or not isinstance(e, int):
        raise ConfigError(f"prune.options.rewind_epoch: expected an integer epoch, got {e!r}")
    epochs = cfg.teacher.optim.epochs
    if not 0 <= e <= epochs:
        raise ConfigError(f"prune.options.rewind_epoch: {e} is outside 0..teacher.optim.epochs ({epochs}); pick an epoch the "
                          f"teacher trains through")


# Every IMP variant prunes in rounds, and its levels nest: round k of one run to the highest
# sparsity is a lower sparsity.
register_strategy("imp", imp, Options, nested_levels=True, rounds=True, snapshot_epoch=_snapshot, check=_check_rewind,
                  retrain_optim=_retrain_optim)
register_strategy("imp_weight_rewind", imp_weight_rewind, WeightRewindOptions, nested_levels=True, rounds=True,
                  snapshot_epoch=_snapshot, check=_check_rewind)
register_strategy("imp_finetune", imp_finetune, FinetuneOptions, nested_levels=True, rounds=True,
                  retrain_optim=lambda retrain, o: _retrain_optim(retrain, o, "finetune"))
