"""Importance scores: ``dict[param name -> tensor]`` shaped like the weights; higher = keep.

Kept apart from schedules so any strategy can use any score.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ptd.pruning.masks import Masks, unwrap


@torch.no_grad()
def magnitude(model: nn.Module, masks: Masks) -> dict[str, torch.Tensor]:
    """|w| (L1 magnitude), the paper's score."""
    params = dict(unwrap(model).named_parameters())
    return {n: params[n].detach().abs().float() for n in masks}
