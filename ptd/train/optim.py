"""The paper's optimizer everywhere: SGD, Nesterov momentum, multi-step LR (stepped per epoch)."""
from __future__ import annotations

import torch
import torch.nn as nn

from ptd.config import OptimConfig


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    # foreach: one fused update over all tensors instead of a Python loop per tensor (CPU too).
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay, foreach=True)


def make_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(cfg.milestones), gamma=cfg.gamma)

