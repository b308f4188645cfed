"""Distillation: the ``Distiller`` unit and its losses, one file per loss, registered by name.

Every module in this package is imported here (pkgutil), so adding a loss is adding one file
with one ``@register_loss`` class; nothing else lists the losses.
"""
from __future__ import annotations

import importlib
import pkgutil

from ptd.distill.base import LOSSES, PENULTIMATE, DistillBatch, DistillLoss, LossSetup, register_loss

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")

from ptd.distill.distiller import Distiller, build_distiller, build_loss, loss_names, loss_options  # noqa: E402

__all__ = ["LOSSES", "PENULTIMATE", "DistillBatch", "DistillLoss", "Distiller", "LossSetup", "build_distiller",
           "build_loss", "loss_names", "loss_options", "register_loss"]
