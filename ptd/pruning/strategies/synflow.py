"""Iterative SynFlow (Tanaka et al. 2020): data-free pruning by synaptic flow, then retrain once.

Scores |∂R/∂θ ⊙ θ| (see ``ptd.pruning.scores.synflow``) are recomputed ``iterations`` times
(default 100, as in the paper) on the shrinking network. The surviving count follows an
exponential schedule from the a_0 weights alive at the start to the K = round(total * (1 - target))
at the end: after iteration k of n, keep round(a_0 * (K / a_0)^(k / n)); the last iteration keeps
exactly K. Iterating is what keeps SynFlow from disconnecting whole layers (layer collapse).
Global ranking; one level, retrained with ``prune.retrain``.

Options: ``iterations`` (int >= 1, default 100). Each is one forward and backward pass of a
single all-ones input in float64: cheap next to any retraining.
"""
from __future__ import annotations

from dataclasses import dataclass

from ptd.pruning.base import Level, PruneContext, prune_once, register_strategy
from ptd.pruning.masks import Masks, count
from ptd.pruning.scores import synflow as synflow_scores
from ptd.pruning.select import global_topk, keep_for_target

# 100x the paper's 100 iterations. Each is a forward and backward pass of the teacher plus a global
# top-k over its weights. At 10,000 an iteration removes under 0.05% of the alive weights even for a
# 99% target (1 - 0.01^(1/10000)), so more iterations change nothing; 1e9 was accepted and was
# still pruning long after the teacher had trained.
MAX_ITERATIONS = 10_000


@dataclass(frozen=True)
class Options:
    iterations: int = 100  # pruning iterations on an exponential schedule to the target

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ValueError(f"iterations: {self.iterations!r} must be >= 1")
        if self.iterations > MAX_ITERATIONS:
            raise ValueError(f"iterations: {self.iterations!r} must be at most {MAX_ITERATIONS:,} (100x the paper's 100; more never finish "
                             f"and change nothing)")


def keep_schedule(alive: int, keep: int, iterations: int) -> list[int]:
    """Survivors after each of ``iterations`` rounds, exponential from ``alive`` to ``keep`` (exact at the end)."""
    if alive == 0:
        return [0] * iterations
    out = [int(round(alive * (keep / alive) ** (k / iterations))) for k in range(1, iterations + 1)]
    out[-1] = keep
    return out


def synflow_prune(model, masks: Masks, input_shape, keep: int, iterations: int) -> Masks:
    alive, _ = count(masks)
    for k in keep_schedule(alive, keep, iterations):
        if k < count(masks)[0]:
            masks = global_topk(synflow_scores(model, masks, input_shape), masks, k)
    return masks


def synflow(ctx: PruneContext) -> list[Level]:
    iterations = ctx.options.iterations
    shape = tuple(ctx.example_input.shape[1:])
    return prune_once(ctx, "synflow", lambda: synflow_prune(ctx.model, ctx.masks, shape, keep_for_target(ctx.masks, ctx.cfg.target_sparsity), iterations))


register_strategy("synflow", synflow, Options)
