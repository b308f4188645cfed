"""Gradual magnitude pruning (Zhu & Gupta 2017) inside one training run.

Starting from the dense teacher, the run trains with ``prune.retrain`` while a hook raises the
sparsity along the cubic schedule

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))^3,   t0 <= t <= t0 + n * dt,

pruning (global |w| among the alive weights) every ``dt`` optimizer steps; s_i is the sparsity at
the start (0 for a dense teacher), s_f the target, t0 = start_epoch * steps_per_epoch and
t0 + n * dt = end_epoch * steps_per_epoch (when dt does not divide the span, the last event is at
the span's end and the formula uses the span as n * dt). After end_epoch the masks stay fixed and
the rest of the run recovers accuracy. The last event prunes to exactly round(total * (1 - s_f)).

Options:
- ``start_epoch`` (int, default 0): first epoch of the ramp;
- ``end_epoch`` (int, default ceil(0.6 * prune.retrain.epochs)): epoch at whose start the
  target is reached (<= prune.retrain.epochs);
- ``frequency_steps`` (int, default 100): dt, optimizer steps between pruning events.

Steps per epoch come from ``ctx.extra["steps_per_epoch"]`` (the pipeline's len(train loader));
the hook refuses to start without them.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from dataclasses import dataclass

from ptd.config import MAX_EPOCHS, ConfigError
from ptd.pruning.base import Level, format_acc, PruneContext, level_metrics, register_strategy, strategy_options, sync_masks
from ptd.pruning.masks import Masks, apply_masks, count, unwrap
from ptd.pruning.scores import magnitude
from ptd.pruning.select import global_topk, keep_for_target


@dataclass(frozen=True)
class Options:
    start_epoch: int = 0  # retraining epoch the ramp starts at
    end_epoch: int | None = None  # epoch the ramp reaches the target; None: max(start + 1, ceil(0.6 * epochs))
    frequency_steps: int = 100  # optimizer steps between mask updates

    def __post_init__(self) -> None:
        # Alone, an option knows no schedule; check_window holds them to prune.retrain.epochs.
        if not 0 <= self.start_epoch < MAX_EPOCHS:
            raise ValueError(f"start_epoch: {self.start_epoch!r} must be >= 0 and below prune.retrain.epochs (at most {MAX_EPOCHS:,})")
        if self.end_epoch is not None and not 1 <= self.end_epoch <= MAX_EPOCHS:
            raise ValueError(f"end_epoch: {self.end_epoch!r} must be >= 1 and at most prune.retrain.epochs (at most {MAX_EPOCHS:,})")
        if self.frequency_steps < 1:
            raise ValueError(f"frequency_steps: {self.frequency_steps!r} must be >= 1")


def check_window(options: Options, epochs: int) -> tuple[int, int]:
    """The ramp's (start, end) epochs within a retraining of ``epochs`` (prune.retrain.epochs), or a
    one-line ConfigError. Needs the schedule, so the Options cannot check it themselves: the
    pipeline's checks call it before any training, and gmp() again where it runs."""
    start = options.start_epoch
    end = options.end_epoch if options.end_epoch is not None else max(start + 1, math.ceil(0.6 * epochs))
    if not start < end <= epochs:
        raise ConfigError(f"prune.options.end_epoch: {end} must be > start_epoch ({start}) and <= prune.retrain.epochs ({epochs}); "
                          f"set prune.options start_epoch and end_epoch within the retraining, or raise prune.retrain.epochs")
    return start, end


def cubic_sparsity(t: float, s_i: float, s_f: float, t0: float, t_end: float) -> float:
    """Zhu & Gupta's s_t, clamped to s_i before t0 and s_f after t_end (t_end = t0 + n * dt)."""
    if t <= t0:
        return s_i
    if t >= t_end:
        return s_f
    return s_f + (s_i - s_f) * (1.0 - (t - t0) / (t_end - t0)) ** 3


class GMPHook:
    """Training hook that prunes ``masks`` IN PLACE along the cubic schedule.

    ``masks`` must be the very dict given to ``ctx.train`` (MaskHook enforces the same object).
    Its state (step count, steps per epoch, masks) goes into the run's resume checkpoint.
    """

    def __init__(self, masks: Masks, target: float, start_epoch: int, end_epoch: int, frequency_steps: int,
                 steps_per_epoch: int | None = None):
        self.masks = masks
        self.target = target
        self.first_epoch, self.last_epoch, self.dt = start_epoch, end_epoch, frequency_steps
        self.spe = steps_per_epoch
        alive, self.total = count(masks)
        self.s_i = 1.0 - alive / self.total if self.total else 0.0
        self.step = 0

    # -------------------------------------------------------------- schedule
    def window(self) -> tuple[int, int]:
        assert self.spe is not None
        return self.first_epoch * self.spe, self.last_epoch * self.spe

    def sparsity_at(self, t: int) -> float:
        t0, t1 = self.window()
        return cubic_sparsity(t, self.s_i, self.target, t0, t1)

    def keep_at(self, t: int) -> int:
        t0, t1 = self.window()
        if t >= t1:
            return keep_for_target(self.masks, self.target)  # exact at the end
        return min(count(self.masks)[0], int(round(self.total * (1.0 - self.sparsity_at(t)))))

    def is_event(self, t: int) -> bool:
        t0, t1 = self.window()
        return t0 <= t <= t1 and ((t - t0) % self.dt == 0 or t == t1)

    @torch.no_grad()
    def prune_to(self, model: nn.Module, keep: int) -> None:
        if keep >= count(self.masks)[0]:
            return
        # Rank 0's choice on every rank (a no-op on one process): DDP keeps the weights equal, but a
        # tie broken by another rank's last bit would let the ranks train different sparse nets until
        # the level's final sync (every rank calls after_step at the same step, so the broadcast meets).
        new = sync_masks(global_topk(magnitude(model, self.masks), self.masks, keep))
        for n in self.masks:  # in place: MaskHook holds this dict
            self.masks[n] = new[n]
        apply_masks(model, self.masks)

    # -------------------------------------------------------------- hook protocol
    def on_start(self, model: nn.Module) -> None:
        # The schedule is in steps, so it needs the epoch's step count before the first step. It was
        # once measured at the first epoch's end, with a catch-up prune there: after validation, so
        # that epoch's saved weights were not the ones it scored (review); the pipeline always knew it.
        if not self.spe:
            raise ValueError("GMPHook: steps_per_epoch is required (the training loader's batches per epoch); "
                             "pass it, as the pipeline does through PruneContext.extra['steps_per_epoch']")
        apply_masks(model, self.masks)

    def after_step(self, model: nn.Module) -> None:
        self.step += 1
        if self.is_event(self.step):
            self.prune_to(model, self.keep_at(self.step))

    def allow_best(self, epoch: int) -> bool:
        """Only checkpoints taken once the ramp has ended (final masks) may be the level's weights."""
        return epoch + 1 >= self.last_epoch

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "spe": self.spe or 0, "masks": {n: m.to(torch.uint8).cpu() for n, m in self.masks.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.spe = int(state["spe"]) or self.spe
        for n, m in state["masks"].items():
            self.masks[n] = m.bool().to(self.masks[n].device)


def gmp(ctx: PruneContext) -> list[Level]:
    o = ctx.options
    ctx.require_prunable()
    cfg = ctx.cfg
    start, end = check_window(o, cfg.retrain.epochs)
    dt = o.frequency_steps
    if cfg.target_sparsity == 0:
        return []
    if ctx.level_done(1):
        return [ctx.load_level(1)]
    spe = ctx.extra.get("steps_per_epoch")
    masks: Masks = {n: m.clone() for n, m in ctx.masks.items()}
    hook = GMPHook(masks, cfg.target_sparsity, start, end, dt, spe)
    trained = ctx.train(ctx.model, masks, "level_1", cfg.retrain, (hook,))
    extra: dict[str, Any] = {"gmp_start_epoch": start, "gmp_end_epoch": end, "gmp_frequency_steps": dt}
    # fit hands back the best-validation weights. If that epoch came before the ramp ended, those
    # weights are denser than the final masks, which then cut them without retraining, and the
    # accuracies fit measured are not the pruned model's: flag it and measure again.
    params = dict(unwrap(ctx.model).named_parameters())
    revived = sum(int(((params[n].detach() != 0) & ~masks[n].to(params[n].device)).sum()) for n in masks)
    best = trained.get("best_epoch")
    keep = keep_for_target(ctx.masks, cfg.target_sparsity)
    if count(masks)[0] != keep:  # only if the ramp never reached its end (should not happen)
        ctx.log("gmp: schedule ended short of the target; pruning the rest at once")
        hook.prune_to(ctx.model, keep)
    apply_masks(ctx.model, masks)
    if revived or (best is not None and best < end):
        extra["best_epoch_before_final_mask"] = True
        ctx.log(f"gmp: the best-validation epoch ({best}) precedes end_epoch ({end}); accuracies re-measured on the final masks. Set end_epoch earlier")
        ev = ctx.evaluate(ctx.model)
        trained = {**trained, **{k: ev[k] for k in ("val_acc", "test_acc") if k in ev}}
    level = Level(1, masks, level_metrics("gmp", masks, trained, **extra))
    ctx.save_level(level)
    ctx.log(f"prune gmp: sparsity {level.sparsity:.4f}, val acc {format_acc(trained.get('val_acc'))}")
    return [level]


def _check(name: str, opts: dict, cfg) -> None:
    """Before the teacher trains: the ramp lies inside the retraining it runs in."""
    try:
        o = strategy_options(name, opts)
    except (ConfigError, TypeError, ValueError, KeyError):
        return  # bad option names or types: ptd.pipeline.check_plugins names them
    check_window(o, cfg.prune.retrain.epochs)


register_strategy("gmp", gmp, Options, check=_check)
