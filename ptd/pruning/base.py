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
from ptd.pruning.masks import Masks, sparsity
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
