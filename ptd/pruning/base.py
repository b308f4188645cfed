"""What a pruning strategy sees (PruneContext) and produces (Levels).

A strategy is a function ``run(ctx: PruneContext) -> list[Level]`` registered under a name. It
never touches files itself: it asks the context to train, to evaluate, and to save or restore a
level, so every strategy is resumable level by level for free.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn

from ptd.config import OptimConfig, PruneConfig
from ptd.pruning.masks import Masks, apply_masks, count, same_or_subset, sparsity
from ptd.registry import Registry

STRATEGIES: Registry[Callable[["PruneContext"], list["Level"]]] = Registry("pruning strategy")


def get_strategy(name: str) -> Callable[["PruneContext"], list["Level"]]:
    return STRATEGIES.get(name)


@dataclass
class Level:
    """One pruned teacher: its index (0 = dense), masks, and metrics (sparsity, accuracies, cost)."""

    index: int
    masks: Masks
    metrics: dict[str, Any]

    @property
    def sparsity(self) -> float:
        return sparsity(self.masks)


@dataclass
class PruneContext:
    model: nn.Module  # the trained teacher, pruned in place
    masks: Masks  # starting masks (all alive, or a pre-pruned checkpoint's nonzeros)
    cfg: PruneConfig
    # train(model, masks, name, optim, hooks) -> fit summary; keeps masked weights at zero,
    # restarts the LR schedule, resumes an interrupted run of the same name.
    train: Callable[[nn.Module, Masks, str, OptimConfig, Sequence[Any]], dict[str, Any]]
    # evaluate(model) -> {"val_acc", "test_acc"}
    evaluate: Callable[[nn.Module], dict[str, float]]
    # batches(n) -> n training batches (x, y) on the device, for data-driven scores (SNIP)
    batches: Callable[[int], list[tuple[torch.Tensor, torch.Tensor]]]
    # level_done(k) -> bool; load_level(k) restores model + masks in place and returns the Level;
    # save_level(level) writes it (called by strategies after each level)
    level_done: Callable[[int], bool]
    load_level: Callable[[int], Level]
    save_level: Callable[[Level], None]
    example_input: torch.Tensor  # one input batch shape for data-free scores (SynFlow)
    teacher_dir: Path | None = None  # where early-epoch teacher weights live (weight rewinding)
    log: Callable[[str], None] = print
    extra: dict[str, Any] = field(default_factory=dict)

    def option(self, key: str, default: Any) -> Any:
        return self.cfg.options.get(key, default)

    def check_options(self, strategy: str, allowed: Sequence[str]) -> None:
        unknown = sorted(set(self.cfg.options) - set(allowed))
        if unknown:
            from ptd.config import ConfigError

            raise ConfigError(f"prune.options.{unknown[0]}: unknown option for strategy {strategy!r}; valid: {', '.join(allowed) or '(none)'}")

    def int_option(self, key: str, default: int | None, minimum: int | None = None) -> int | None:
        """An integer option (bools rejected), at least ``minimum``; one-line ConfigError otherwise."""
        from ptd.config import ConfigError

        v = self.cfg.options.get(key, default)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"prune.options.{key}: expected an integer, got {v!r}")
        if minimum is not None and v < minimum:
            raise ConfigError(f"prune.options.{key}: {v!r} must be >= {minimum}")
        return v

    def bool_option(self, key: str, default: bool) -> bool:
        from ptd.config import ConfigError

        v = self.cfg.options.get(key, default)
        if not isinstance(v, bool):
            raise ConfigError(f"prune.options.{key}: expected true or false, got {v!r}")
        return v

    def require_prunable(self) -> int:
        """Total number of prunable weights; a one-line ConfigError when there are none."""
        from ptd.config import ConfigError

        _, total = count(self.masks)
        if total == 0:
            raise ConfigError(
                "prune: no prunable weights (the model has no Conv/Linear weight left after "
                f"exclude_first={self.cfg.exclude_first}, exclude_last={self.cfg.exclude_last}); "
                "valid: set prune.exclude_first/exclude_last to false, or use a model with Conv/Linear layers"
            )
        return total


def level_metrics(strategy: str, masks: Masks, trained: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """What ``ctx.train`` returned (val_acc, test_acc, epochs, steps, wall_s: summed for cost
    accounting), plus the level's size and how it was made."""
    alive, total = count(masks)
    return {**trained, "strategy": strategy, "alive": alive, "total": total, "sparsity": sparsity(masks), **extra}


def prune_once(
    ctx: PruneContext,
    strategy: str,
    select: Callable[[], Masks],
    hooks: Sequence[Any] = (),
) -> list[Level]:
    """The shared skeleton of the one-level strategies: ``select()`` -> masks at the target, then
    one retraining with ``prune.retrain``, saved as level 1.

    Resume: a finished level 1 is loaded, not retrained; an interrupted retraining is resumed by
    ``ctx.train`` (same run name), which needs ``select()`` to give the same masks again, so every
    selection here is deterministic given the teacher's weights (and seeded for random ones).
    A target of 0 gives no levels, as IMP does.
    """
    import time

    ctx.require_prunable()
    if ctx.cfg.target_sparsity == 0:
        return []
    if ctx.level_done(1):
        return [ctx.load_level(1)]
    t0 = time.perf_counter()
    masks = select()
    score_s = time.perf_counter() - t0
    if not same_or_subset(ctx.masks, masks):  # a strategy bug, never a user error
        raise RuntimeError(f"{strategy}: selection revived pruned weights")
    apply_masks(ctx.model, masks)
    trained = ctx.train(ctx.model, masks, "level_1", ctx.cfg.retrain, hooks)
    apply_masks(ctx.model, masks)
    level = Level(1, masks, level_metrics(strategy, masks, trained, score_wall_s=round(score_s, 3)))
    ctx.save_level(level)
    ctx.log(f"prune {strategy}: sparsity {level.sparsity:.4f}, val acc {trained.get('val_acc', float('nan'))}")
    return [level]
