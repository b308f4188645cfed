"""Model registry: every family registers a builder under a name.

``build_model(arch, num_classes=..., in_channels=..., width=..., **kwargs)`` builds one and
records the call on ``model.ptd_spec`` (a JSON-able dict), so any model ptd builds can be rebuilt
from plain text: that is how students are saved and reloaded without their teacher.
"""
from __future__ import annotations

import json
from typing import Any, Callable

import torch.nn as nn

from ptd.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")

# Families register themselves on import.
from ptd.models import vgg  # noqa: E402,F401


def _lookup(arch: str) -> Callable[..., nn.Module]:
    if arch.startswith("tv:"):
        from ptd.models import torchvision_models

        return torchvision_models.builder(arch[3:])
    return MODELS.get(arch)


def build_model(arch: str, num_classes: int, in_channels: int = 3, width: float = 1.0, **kwargs: Any) -> nn.Module:
    builder = _lookup(arch)
    model = builder(num_classes=num_classes, in_channels=in_channels, width=width, **kwargs)
    model.ptd_spec = {"arch": arch, "num_classes": num_classes, "in_channels": in_channels, "width": width, **kwargs}
    return model


def model_names() -> list[str]:
    return MODELS.names()


def spec_to_text(spec: dict) -> str:
    return json.dumps(spec, indent=2, sort_keys=True) + "\n"


def build_from_spec(spec: dict) -> nn.Module:
    spec = dict(spec)
    return build_model(spec.pop("arch"), **spec)
