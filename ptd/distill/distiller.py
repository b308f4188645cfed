"""The distillation unit: student + loss modules in one ``nn.Module``, teacher frozen outside it.

The training loop optimizes, moves, DDP-wraps, checkpoints and resumes whatever unit it is given,
so a loss's trainable parts (a FitNet regressor, a CRD embedding, a memory bank buffer) train,
sync and resume with the student without the loop knowing about them. ``model.safetensors``
stays the student's weights alone.

Features reach the losses through forward hooks on named modules (``PENULTIMATE``: a forward
pre-hook on the last ``nn.Linear``), cast to float32 so a loss never computes on bf16.
"""
from __future__ import annotations

import functools
import operator
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn

from ptd.config import ConfigError, from_dict
from ptd.distill.base import LOSSES, PENULTIMATE, DistillBatch, DistillLoss, LossSetup


def loss_names(loss: str | Sequence[str]) -> tuple[str, ...]:
    """``distill.loss`` as a tuple of names (the config accepts one name or a list)."""
    return (loss,) if isinstance(loss, str) else tuple(loss)


def loss_options(name: str, section: Mapping[str, Any] | None = None, defaults: Mapping[str, Any] | None = None,
                 where: str = "distill.options") -> Any:
    """Build loss ``name``'s typed Options from ``section`` (its ``distill.options.<name>`` mapping).

    ``defaults`` are distill-section values (``alpha``, ``temperature``), used for the Options
    fields the loss lists in ``distill_keys`` (KD's) unless ``section`` sets them; every other loss
    keeps its own defaults.
    Raises a one-line ConfigError for an unknown loss, an unknown key (listing the valid ones) or
    a value the Options reject.
    """
    cls = LOSSES.get(name)
    fields = {f for f in getattr(cls.Options, "__dataclass_fields__", {})}
    data = {k: v for k, v in (defaults or {}).items() if k in fields and k in cls.distill_keys}
    data.update(section or {})
    key = f"{where}.{name}"
    try:
        return from_dict(cls.Options, data, key, "config")
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{key}: {e}; fix the value (valid keys: {', '.join(sorted(fields)) or 'none'})") from None


def check_layer_map(layer_map: Mapping[str, str], opts: Mapping[str, Any]) -> None:
    """``distill.layer_map`` renames layers the losses read on the student (``opts``: each loss's
    typed Options, from ``loss_options``), so each key must be one of those layers: a map given
    with logit-only losses (kd), or a key no loss reads (a typo), would otherwise be ignored
    silently. The values are checked against the student's modules with the layers themselves
    (ptd.pipeline.check_layers)."""
    if not layer_map:
        return
    read = sorted({layer for name, o in opts.items() for layer in LOSSES.get(name).feature_layers(o)[1]})
    if not read:
        raise ConfigError(f"distill.layer_map: {dict(layer_map)} renames student layers, but distill.loss ({', '.join(opts)}) reads "
                          f"only logits; remove distill.layer_map, or use a loss that reads layers (e.g. at, fitnet, crd)")
    for key in layer_map:
        if key not in read:
            raise ConfigError(f"distill.layer_map.{key}: no loss reads a student layer named {key!r} (they read {', '.join(read)}); "
                              f"map one of those, or remove the key")


def _last_linear(model: nn.Module) -> nn.Module:
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is None:
        raise ConfigError(f"distill: {PENULTIMATE} needs an nn.Linear classifier, and {type(model).__name__} has none; "
                          f"name a module instead")
    return last


class _Taps:
    """Forward hooks that record named modules' outputs (float32) into ``self.out`` each pass."""

    def __init__(self, model: nn.Module, names: Sequence[str], side: str):
        self.out: dict[str, torch.Tensor] = {}
        self.handles = []
        modules = dict(model.named_modules())
        for name in dict.fromkeys(names):  # unique, in order
            if name == PENULTIMATE:
                # The classifier's input is the pooled embedding; a pre-hook sees it before the Linear.
                self.handles.append(_last_linear(model).register_forward_pre_hook(self._pre(name)))
                continue
            if name not in modules:
                some = ", ".join(n for n in list(modules)[1:9])
                raise ConfigError(f"distill: the {side} has no module {name!r}; name one of model.named_modules() "
                                  f"(e.g. {some}, ...) or {PENULTIMATE}, or map it with distill.layer_map")
            self.handles.append(modules[name].register_forward_hook(self._post(name)))

    def _pre(self, name: str):
        def hook(_m: nn.Module, args: tuple) -> None:
            self.out[name] = args[0].float()

        return hook

    def _post(self, name: str):
        def hook(_m: nn.Module, _args: tuple, output: Any) -> None:
            out = output[0] if isinstance(output, (tuple, list)) else output
            self.out[name] = out.float()

        return hook

    def take(self) -> dict[str, torch.Tensor]:
        out, self.out = self.out, {}
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class Distiller(nn.Module):
    """``forward(x, y, index=None, epoch=0) -> (total loss, student logits, {term name: value})``.

    Holds ``student`` and one loss as submodules (parameters, buffers, state_dict; the loss in a
    one-element ``losses`` list, whose ``losses.0.*`` keys resume files hold); the teacher
    is kept outside them: frozen, in eval mode, run without gradients, never saved with the unit.
    ``layer_map`` renames a loss's student layer names to the student's own module names (for a
    named student whose modules are not called as the teacher's).
    """

    def __init__(self, student: nn.Module, losses: Sequence[DistillLoss], teacher: nn.Module | None = None,
                 layer_map: Mapping[str, str] | None = None):
        super().__init__()
        if not losses:
            raise ConfigError("distill.loss: no loss given; name at least one, e.g. kd")
        if len(losses) > 1:
            # Every loss carries its own label term (kd: (1 - alpha) CE, the others a CE beside their
            # own), so a sum of two counts the labels twice, and both return a term named "ce": the
            # unit failed at its first step (review). A list in distill.loss is one student per loss.
            raise ValueError(f"a Distiller trains one loss, got {len(losses)} ({', '.join(type(l).loss_name for l in losses)}); "
                             f"build one per loss, as the pipeline does for each name in distill.loss")
        self.student = student
        self.losses = nn.ModuleList(losses)
        self.layer_map = dict(layer_map or {})
        needs_teacher = [type(l).loss_name for l in losses if l.needs_teacher]
        if needs_teacher and teacher is None:
            raise ConfigError(f"distill.loss: {', '.join(needs_teacher)} needs a teacher, and this arm has none; "
                              f"use ce for the scratch arm")
        # Not a submodule: .to(), .train(), parameters() and state_dict() of the unit leave it alone.
        self.__dict__["teacher"] = teacher if needs_teacher else None
        if self.teacher is not None:
            freeze(self.teacher)
        t_names, s_names = _layers(losses)
        self._t_taps = _Taps(self.teacher, t_names, "teacher") if self.teacher is not None and t_names else None
        self._s_taps = _Taps(student, [self.layer_map.get(n, n) for n in s_names], "student") if s_names else None

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None,
                epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        t_logits, t_feats = None, {}
        if self.teacher is not None:
            if self.teacher.training:  # someone trained it in between: BatchNorm must use running stats
                self.teacher.eval()
            with torch.no_grad():
                t_logits = self.teacher(x)
            t_feats = self._t_taps.take() if self._t_taps is not None else {}
        s_logits = self.student(x)
        s_feats = {}
        if self._s_taps is not None:
            got = self._s_taps.take()
            s_feats = {n: got[self.layer_map.get(n, n)] for n in _layers(self.losses)[1]}
        batch = DistillBatch(y=y, index=index, epoch=int(epoch), s_logits=s_logits, t_logits=t_logits,
                             s_feats=s_feats, t_feats=t_feats)
        terms = dict(self.losses[0](batch))
        # Left-to-right sum: for kd, exactly alpha*soft + (1-alpha)*hard as it was computed before.
        total = functools.reduce(operator.add, terms.values())
        return total, s_logits, terms

    def remove_hooks(self) -> None:
        for taps in (self._t_taps, self._s_taps):
            if taps is not None:
                taps.remove()


def freeze(teacher: nn.Module) -> nn.Module:
    """Eval mode (BatchNorm on running statistics) and no gradients."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _layers(losses: Sequence[DistillLoss]) -> tuple[list[str], list[str]]:
    t, s = [], []
    for loss in losses:
        ti, si = type(loss).feature_layers(loss.options)
        t += [n for n in ti if n not in t]
        s += [n for n in si if n not in s]
    return t, s


@torch.no_grad()
def _probe(model: nn.Module, names: Sequence[str], example: torch.Tensor, side: str) -> dict[str, tuple[int, ...]]:
    """Per-sample shapes of the named features, from one eval-mode pass (no BatchNorm update)."""
    if not names:
        return {}
    taps = _Taps(model, names, side)
    was = model.training
    model.eval()
    try:
        model(example)
        return {n: tuple(v.shape[1:]) for n, v in taps.take().items()}
    finally:
        taps.remove()
        model.train(was)


def build_loss(name: str, options: Any = None, setup: LossSetup | None = None) -> DistillLoss:
    """One loss with its Options (a mapping is validated into them; None: defaults)."""
    cls = LOSSES.get(name)
    if options is None or isinstance(options, Mapping):
        options = loss_options(name, options)
    return cls(options, setup or LossSetup(num_classes=0, num_samples=0))


def build_distiller(student: nn.Module, teacher: nn.Module | None, names: str | Sequence[str], *,
                    options: Mapping[str, Mapping[str, Any]] | None = None, defaults: Mapping[str, Any] | None = None,
                    num_classes: int, num_samples: int, epochs: int = 1,
                    example_input: torch.Tensor | Callable[[], torch.Tensor] | None = None,
                    layer_map: Mapping[str, str] | None = None, labels: torch.Tensor | None = None,
                    batch_size: int | None = None) -> Distiller:
    """Options from the config, a probe pass for the feature shapes, then the losses and the unit.

    ``batch_size``: the training batch, for losses that check their per-step memory (CRD).

    ``example_input``: one batch (any size >= 1) of the training input shape on the student's
    device, or a function returning one (called only when a loss reads features).
    """
    names = loss_names(names)
    if len(names) > 1:  # before any loss is built (CRD allocates its memory banks): Distiller refuses it anyway
        raise ValueError(f"a Distiller trains one loss, got {len(names)} ({', '.join(names)}); build one per loss, as the "
                         f"pipeline does for each name in distill.loss")
    options = options or {}
    for k in options:
        if k not in names:
            raise ConfigError(f"distill.options.{k}: options for a loss that is not in distill.loss ({', '.join(names)}); "
                              f"remove them or add {k} to distill.loss")
    opts = {n: loss_options(n, options.get(n), defaults) for n in names}
    t_names, s_names = [], []
    for n in names:
        ti, si = LOSSES.get(n).feature_layers(opts[n])
        t_names += ti
        s_names += si
    lmap = dict(layer_map or {})
    t_shapes, s_shapes = {}, {}
    if t_names or s_names:
        if example_input is None:
            raise ValueError("build_distiller: a loss reads features, so pass example_input (one input batch)")
        if callable(example_input):
            example_input = example_input()
        if teacher is not None:
            t_shapes = _probe(teacher, t_names, example_input, "teacher")
        got = _probe(student, [lmap.get(n, n) for n in s_names], example_input, "student")
        s_shapes = {n: got[lmap.get(n, n)] for n in s_names}
    setup = LossSetup(num_classes=num_classes, num_samples=num_samples, teacher_shapes=t_shapes,
                      student_shapes=s_shapes, epochs=epochs, labels=labels, batch_size=batch_size)
    losses = [LOSSES.get(n)(opts[n], setup) for n in names]
    if teacher is not None and not t_names:
        # Logit-only losses: the frozen teacher runs eval-mode forwards only, so its BatchNorms can be
        # folded into the convs before them (forward 1.23x, KD step 1.19x on this CPU, docs/speed.md).
        # Not when a loss hooks teacher layers by name: folding removes the BatchNorm modules.
        from ptd.models.fold import fold_batchnorm

        teacher.eval().requires_grad_(False)  # the caller's teacher is frozen too, folded or not
        try:
            teacher = fold_batchnorm(teacher)
        except ValueError:
            pass  # a teacher torch.fx cannot trace (some user modules) runs unfolded: same result, slower
    return Distiller(student, losses, teacher, layer_map=lmap)
