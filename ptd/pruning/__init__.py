"""Unstructured pruning: masks, importance scores, selection, and strategies (schedules).

Scores (``scores.py``) say how much each weight matters; selection (``select.py``) turns scores into
masks of an exact size; a strategy (one file each under ``strategies/``) decides when to score,
how much to cut and how to retrain. Strategies are registered by name in ``STRATEGIES``.
"""
from ptd.pruning.base import SPECS, STRATEGIES, Level, PruneContext, StrategySpec, get_strategy, options_for, register_strategy, retrain_optim, strategy_options
from ptd.pruning.masks import Masks, MaskHook, apply_masks, full_masks, prunable_weights, sparsity

# Strategies register themselves on import.
from ptd.pruning import strategies  # noqa: E402,F401

__all__ = ["SPECS", "STRATEGIES", "Level", "PruneContext", "StrategySpec", "get_strategy", "options_for", "register_strategy", "retrain_optim", "strategy_options", "Masks", "MaskHook", "apply_masks", "full_masks", "prunable_weights", "sparsity"]
