"""Any torchvision classification model by name: arch ``tv:<name>`` (e.g. ``tv:resnet18``).

Built with ``torchvision.models.get_model(name, weights=None, num_classes=...)`` -- never with
pretrained weights (ptd runs offline). If ``in_channels`` differs from the model's, the first conv
is replaced by one taking ``in_channels`` (same kernel, stride, padding, bias). ``width`` other
than 1.0 is passed as ``width_mult`` to models that take one (MobileNet V2/V3, MNASNet's
``alpha``), otherwise refused. Extra keyword arguments go to the torchvision constructor.
"""
from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn

from ptd.registry import UnknownNameError


def classification_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            if m.in_channels == in_channels:
                return
            if m.groups != 1:
                raise ValueError(f"cannot change the input channels of {type(model).__name__}: its first conv is grouped")
            new = nn.Conv2d(
                in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                dilation=m.dilation, bias=m.bias is not None, padding_mode=m.padding_mode,
            )
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], new)
            return
    raise ValueError(f"{type(model).__name__} has no Conv2d layer whose input channels could be set")


WIDTH_ARG = {"mnasnet": "alpha"}  # name prefix -> keyword; everything else tries width_mult
INIT_WEIGHTS_ARG = {"inception_v3", "googlenet"}  # take init_weights, and warn when it is not given


def builder(name: str) -> Callable[..., nn.Module]:
    names = classification_names()
    if name not in names:
        raise UnknownNameError(f"unknown torchvision classification model {name!r}; valid names: {', '.join('tv:' + n for n in names)}")

    def build(num_classes: int, in_channels: int = 3, width: float = 1.0, **kwargs: Any) -> nn.Module:
        import torchvision

        if "weights" in kwargs and kwargs["weights"] is not None:
            raise ValueError("tv: models are built without pretrained weights (ptd runs offline)")
        kwargs.pop("weights", None)
        if name in INIT_WEIGHTS_ARG:
            # Left unset, torchvision warns on stderr (a FutureWarning above ptd's own lines) that
            # the default init will change; True is that default, stated, so a run keeps its init.
            kwargs.setdefault("init_weights", True)
        if width != 1.0:
            key = next((v for k, v in WIDTH_ARG.items() if name.startswith(k)), "width_mult")
            try:
                model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **{key: width}, **kwargs)
            except TypeError:
                raise ValueError(f"tv:{name} has no width multiplier; use width=1.0") from None
        else:
            model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
        _replace_first_conv(model, in_channels)
        return model

    build.__doc__ = f"torchvision's {name} (no pretrained weights)"
    return build
