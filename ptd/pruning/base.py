"""What a pruning strategy sees (PruneContext) and produces (Levels).

A strategy is a function ``run(ctx: PruneContext) -> list[Level]`` registered under a name with
``register_strategy``, together with its typed, frozen ``Options`` dataclass (built from
``prune.options`` where the strategy is used, so the config module knows no strategy) and what
the orchestration needs to know about it: whether its levels nest (one run to the highest
sparsity yields the lower ones as its levels) and at which teacher epoch it needs a weight
snapshot. It never touches files itself: it asks the context to train, to evaluate, and to save
or restore a level, so every strategy is resumable level by level for free. Under DDP every rank
runs it, and every rank retrains and saves rank 0's masks whatever its scores (``rank0_masks``).
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn

from ptd.config import ConfigError, OptimConfig, PruneConfig, from_dict
from ptd.pruning.masks import Masks, apply_masks, count, same_or_subset, sparsity
from ptd.registry import Registry
from ptd.train.distributed import broadcast_, world_size

STRATEGIES: Registry[Callable[["PruneContext"], list["Level"]]] = Registry("pruning strategy")


def get_strategy(name: str) -> Callable[["PruneContext"], list["Level"]]:
    return STRATEGIES.get(name)


@dataclass(frozen=True)
class NoOptions:
    pass


@dataclass(frozen=True)
class StrategySpec:
    """What a strategy declares when it registers."""

    Options: type = NoOptions  # frozen dataclass; unknown keys and bad values are ConfigErrors
    nested_levels: bool = False  # level k of one run is its k-th round: lower sparsities for free
    # options -> the teacher epoch whose weights the teacher stage must keep (None: none)
    snapshot_epoch: Callable[[Any], int | None] = lambda options: None
    # Prunes in rounds of prune.rate, so a target rounds to a whole number of rounds (preflight
    # refuses one below half a round: no pruning at all).
    rounds: bool = False
    # check(name, options, cfg): the strategy's own check of its prune.options section (the raw
    # mapping, before typing, so it can name a bad value its own way) against the run's config
    # (a RunConfig), before the teacher trains; a one-line ConfigError. ptd.preflight runs it for
    # the run's strategy and every strategy of a sweep, and knows no strategy by name.
    check: Callable[[str, dict, Any], None] = lambda name, options, cfg: None
    # retrain_optim(prune.retrain, options): the optimizer settings each retraining round of the
    # strategy trains with. The control teacher (ptd.pipeline.stage_control) replays them, so it is
    # the same training without the pruning: it once took prune.retrain (lr 0.1, decayed) for
    # imp_finetune, whose rounds train at a constant 1e-3 (review).
    retrain_optim: Callable[[OptimConfig, Any], OptimConfig] = lambda retrain, options: retrain


SPECS: Registry[StrategySpec] = Registry("pruning strategy")


def register_strategy(name: str, run: Callable[["PruneContext"], list["Level"]], Options: type = NoOptions, *,
                      nested_levels: bool = False, snapshot_epoch: Callable[[Any], int | None] | None = None,
                      rounds: bool = False, check: Callable[[str, dict, Any], None] | None = None,
                      retrain_optim: Callable[[OptimConfig, Any], OptimConfig] | None = None) -> None:
    if not (dataclasses.is_dataclass(Options) and Options.__dataclass_params__.frozen):
        raise TypeError(f"pruning strategy {name!r}: Options must be a frozen dataclass")
    @functools.wraps(run)
    def checked(ctx: "PruneContext") -> list["Level"]:
        ctx.options  # validate prune.options before any work, even for a strategy that reads none
        return run(rank0_masks(ctx))

    STRATEGIES.add(name, checked)
    SPECS.add(name, StrategySpec(Options, nested_levels, snapshot_epoch or (lambda options: None), rounds,
                                 check or (lambda name, options, cfg: None), retrain_optim or (lambda retrain, options: retrain)))


def retrain_optim(cfg: PruneConfig) -> OptimConfig:
    """The optimizer settings ``cfg.strategy``'s retraining rounds train with (StrategySpec.retrain_optim)."""
    return SPECS.get(cfg.strategy).retrain_optim(cfg.retrain, strategy_options(cfg.strategy, dict(cfg.options)))


def options_for(options: dict[str, Any], strategy: str) -> dict[str, Any]:
    """``prune.options`` for one strategy: the section under its name when the options are keyed by
    strategy (a sweep over several), else the whole mapping."""
    keyed = [k for k in options if k in STRATEGIES]
    if not keyed:
        return dict(options)
    plain = [k for k in options if k not in STRATEGIES]
    if plain:
        raise ConfigError(f"prune.options: mixes per-strategy sections ({', '.join(keyed)}) with plain options ({', '.join(plain)}); "
                          f"in a sweep put every option under its strategy, e.g. options: {{{keyed[0]}: {{...}}}}")
    section = options.get(strategy) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"prune.options.{strategy}: expected a mapping of that strategy's options, got {section!r}")
    return dict(section)


def strategy_options(strategy: str, options: dict[str, Any]) -> Any:
    """The strategy's typed Options from a plain ``prune.options`` mapping (already the
    strategy's own section), or a one-line ConfigError naming the key and the valid ones."""
    Options = SPECS.get(strategy).Options
    valid = [f.name for f in dataclasses.fields(Options)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(f"prune.options.{unknown[0]}: unknown option for strategy {strategy!r}; valid: {', '.join(valid) or '(none)'}")
    try:
        return from_dict(Options, options, "prune.options", "config")
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"prune.options.{e}") from None


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
    masks: Masks  # starting masks: all alive (stage_prune; a pre-pruned teacher.checkpoint's zeros are weights too)
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

    @property
    def options(self) -> Any:
        """``cfg.options`` as the strategy's typed Options (validated here, where it is used)."""
        return strategy_options(self.cfg.strategy, self.cfg.options)

    def require_prunable(self) -> int:
        """Total number of prunable weights; a one-line ConfigError when there are none."""
        _, total = count(self.masks)
        if total == 0:
            raise ConfigError(
                "prune: no prunable weights (the model has no Conv/Linear weight left after "
                f"exclude_first={self.cfg.exclude_first}, exclude_last={self.cfg.exclude_last}); "
                "valid: set prune.exclude_first/exclude_last to false, or use a model with Conv/Linear layers"
            )
        return total


def format_acc(acc: float | None) -> str:
    """An accuracy (fraction) for a log line: 4 decimals, or "none" without a validation set
    (the log printed 0.43333333333333335 and nan)."""
    return "none" if acc is None or acc != acc else f"{acc:.4f}"


def sync_masks(masks: Masks) -> Masks:
    """Under DDP, replace every mask in ``masks`` by rank 0's (one broadcast, bit for bit) and
    return the same dict; nothing on one process. Every rank must call it.

    The dict keeps its identity (GMP's hook and the retraining's MaskHook hold it); its tensors
    are replaced, not written into, since a selection may return its input's tensors for layers
    it left alone, and those belong to the caller."""
    if world_size() > 1 and masks:
        names = list(masks)
        fresh = [masks[n].clone() for n in names]
        broadcast_(fresh)
        for n, m in zip(names, fresh):
            masks[n] = m
    return masks


def rank0_masks(ctx: PruneContext) -> PruneContext:
    """``ctx`` whose ``train`` and ``save_level`` first make the masks rank 0's (``sync_masks``).

    Every strategy runs through it (``register_strategy``), so whatever its scores, no rank
    retrains, saves or hands on masks of its own: a data-dependent score computed on each rank's
    shard (SNIP, before its gradients were reduced over ranks) gave every rank other masks, the
    weights then drifted apart, and at sparsity 0.8 each rank derived a differently shaped student
    and DDP refused it. On one process, ``ctx`` itself."""
    if world_size() <= 1:
        return ctx
    train, save_level = ctx.train, ctx.save_level

    def synced_train(model: nn.Module, masks: Masks, name: str, optim: OptimConfig, hooks: Sequence[Any]) -> dict[str, Any]:
        apply_masks(model, sync_masks(masks))
        return train(model, masks, name, optim, hooks)

    def synced_save(level: Level) -> None:
        apply_masks(ctx.model, sync_masks(level.masks))
        save_level(level)

    return dataclasses.replace(ctx, train=synced_train, save_level=synced_save)


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
    # Rank 0's masks on every rank: identical whatever the scores (SNIP reduces its gradients over
    # ranks; the data-free scores are the same everywhere) and whatever the selection's tie-breaking.
    masks = sync_masks(select())
    score_s = time.perf_counter() - t0
    if not same_or_subset(ctx.masks, masks):  # a strategy bug, never a user error
        raise RuntimeError(f"{strategy}: selection revived pruned weights")
    apply_masks(ctx.model, masks)
    trained = ctx.train(ctx.model, masks, "level_1", ctx.cfg.retrain, hooks)
    apply_masks(ctx.model, masks)
    level = Level(1, masks, level_metrics(strategy, masks, trained, score_wall_s=round(score_s, 3)))
    ctx.save_level(level)
    ctx.log(f"prune {strategy}: sparsity {level.sparsity:.4f}, val acc {format_acc(trained.get('val_acc'))}")
    return [level]
