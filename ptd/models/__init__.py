"""Model registry: every family registers a builder under a name.

``build_model(arch, num_classes=..., in_channels=..., width=..., **kwargs)`` builds one and
records the call on ``model.ptd_spec`` (a JSON-able dict), so any model ptd builds can be rebuilt
from plain text: that is how students are saved and reloaded without their teacher.
"""
from __future__ import annotations

import importlib
import json
from typing import Any, Callable

import torch.nn as nn

from ptd.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")

# Families register themselves on import.
from ptd.models import vgg  # noqa: E402,F401
from ptd.models import mobilenetv2, resnet, resnet_cifar, wrn  # noqa: E402,F401


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


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DDP / torch.compile wrappers, so parameter names stay stable."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


# Spec keys that a package above this one knows how to replay on a freshly built model, e.g.
# ``channel_widths`` (registered by ptd.students: channel surgery). Registered rather than
# imported, so models depend on nothing above them; a process that never imported the owner (a
# ``jobs`` worker, a library caller reading a student file) has it imported by name on first use.
# fn(model, spec) edits the model in place.
SPEC_STEPS: Registry[Callable[[nn.Module, dict], None]] = Registry("model spec key")
_SPEC_OWNERS = {"channel_widths": "ptd.students"}


def spec_to_text(spec: dict) -> str:
    return json.dumps(spec, indent=2, sort_keys=True) + "\n"


def build_from_spec(spec: dict) -> nn.Module:
    """Rebuild a model from its ``ptd_spec``.

    A student made by channel surgery (a ``tv:`` model, say) has the base model's spec plus
    ``channel_widths`` ({layer name: out channels}) and ``trace_size``: the base is built and the
    same surgery replayed (keeping the first channels of each layer: only shapes matter, the
    weights are loaded afterwards). A student of a user's own nn.Module has ``arch`` None: build
    that architecture yourself and call ``ptd.students.apply_widths(model, spec["channel_widths"],
    spec["trace_size"])``.
    """
    full = dict(spec)
    spec = dict(spec)
    channel_widths = spec.pop("channel_widths", None)
    trace_size = spec.pop("trace_size", 32)
    arch = spec.pop("arch", None)
    if arch is None:
        cls = spec.get("module_class", "a user's own nn.Module")
        raise ValueError(
            f"this spec has no arch: it describes a student of {cls}, which ptd cannot build; construct that "
            "architecture and call ptd.students.apply_widths(model, spec['channel_widths'], spec['trace_size'])"
        )
    spec.pop("module_class", None)
    model = build_model(arch, **spec)
    if channel_widths:
        if "channel_widths" not in SPEC_STEPS:
            # Workers of `jobs: 2` never imported ptd.students, and a surgery student (tv:, a
            # user's registered model) failed there with "import ptd.students first".
            importlib.import_module(_SPEC_OWNERS["channel_widths"])
        SPEC_STEPS.get("channel_widths")(model, {**full, "trace_size": int(trace_size)})
        model.ptd_spec = full
    return model
