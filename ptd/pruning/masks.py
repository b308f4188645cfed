"""Masks for unstructured pruning.

A mask set is ``dict[parameter name -> bool tensor]`` over the prunable weights (by default every
Conv and Linear weight; biases and BatchNorm are never pruned). True = weight alive.

Masks are enforced after each optimizer step (and gradients masked before it), not multiplied in
on every forward pass: the forward stays a plain dense conv, and a pruned weight is exactly 0.0
whatever momentum or weight decay would have done to it.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ptd.errors import LayerCollapseError
from ptd.models import unwrap  # noqa: F401  (re-exported: strategies import it from here)

Masks = dict[str, torch.Tensor]

PRUNABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def prunable_weights(model: nn.Module, exclude_first: bool = False, exclude_last: bool = False) -> dict[str, nn.Parameter]:
    """Every Conv/Linear weight in module order, keyed by parameter name.

    ``exclude_first`` drops the first such layer (the stem), ``exclude_last`` the last one (the
    classifier); the paper prunes both.
    """
    model = unwrap(model)
    out = {f"{name}.weight" if name else "weight": m.weight for name, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)}
    names = list(out)
    if exclude_first and names:
        out.pop(names[0])
    if exclude_last and len(names) > 1:
        out.pop(names[-1])
    return out


def full_masks(params: dict[str, nn.Parameter]) -> Masks:
    return {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()}


def check_masks(model: nn.Module, masks: Masks) -> None:
    params = dict(unwrap(model).named_parameters())
    for n, m in masks.items():
        if n not in params:
            raise ValueError(f"mask for {n!r} has no parameter of that name in the model")
        if tuple(m.shape) != tuple(params[n].shape):
            raise ValueError(f"mask {n!r} has shape {tuple(m.shape)} but the weight has {tuple(params[n].shape)}")


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks) -> None:
    params = dict(unwrap(model).named_parameters())
    for n, m in masks.items():
        p = params[n]
        p.mul_(m.to(device=p.device, dtype=p.dtype))


@torch.no_grad()
def mask_grads(model: nn.Module, masks: Masks) -> None:
    params = dict(unwrap(model).named_parameters())
    for n, m in masks.items():
        g = params[n].grad
        if g is not None:
            g.mul_(m.to(device=g.device, dtype=g.dtype))


def count(masks: Masks) -> tuple[int, int]:
    """(alive, total) over all masked weights."""
    alive = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    return alive, total


def sparsity(masks: Masks) -> float:
    """Pruned fraction of the masked weights, in [0, 1]."""
    alive, total = count(masks)
    return 1.0 - alive / total if total else 0.0


def emptied_layers(masks: Masks) -> list[str]:
    """Names of the masked weights with no weight alive, in mask order."""
    return [n for n, m in masks.items() if not bool(m.any())]


def require_connected(masks: Masks, where: str) -> None:
    """Refuse masks that leave a layer with no weight (layer collapse): every path from input to
    output crosses every layer of a plain or residual stack's trunk, so the pruned network predicts
    one class and the pruned-teacher arm measures nothing. Said before the level's retraining where
    the masks are known then (IMP, one-shot, SNIP, SynFlow), after it for GMP."""
    empty = emptied_layers(masks)
    if not empty:
        return
    shown = ", ".join(empty[:3]) + (f" and {len(empty) - 3} more" if len(empty) > 3 else "")
    raise LayerCollapseError(
        f"{where}: at sparsity {sparsity(masks):.4f} pruning removed every weight of {shown}, so the network predicts one class "
        f"whatever the image (layer collapse); lower prune.target_sparsity, set prune.exclude_last: true if the emptied layer "
        f"is the classifier, or use prune.strategy: synflow, which is built to avoid it")


def layer_report(masks: Masks) -> list[dict]:
    """Per-layer rows: name, shape, total, alive, sparsity."""
    rows = []
    for n, m in masks.items():
        alive = int(m.sum())
        rows.append({"layer": n, "shape": list(m.shape), "total": m.numel(), "alive": alive, "sparsity": 1.0 - alive / m.numel()})
    return rows


def save_masks(path: str | Path, masks: Masks) -> None:
    from ptd.train.checkpoint import save_tensors

    save_tensors(path, {n: m.to(torch.uint8).cpu().contiguous() for n, m in masks.items()})


def load_masks(path: str | Path, model: nn.Module | None = None) -> Masks:
    """Masks saved by ``save_masks``, in ``model``'s parameter order when a model is given.

    safetensors stores keys sorted by name, so without the model the order is alphabetical, not
    the order a fresh run builds them in; a level resumed from disk must hand the next level the
    same order (it orders the global score vector, so ties and the sparsity table follow it), or
    a run killed and resumed would not end bit-identical to one that was not."""
    from ptd.train.checkpoint import load_tensors

    loaded = {n: t.bool() for n, t in load_tensors(path).items()}
    if model is None:
        return loaded
    order = [n for n, _ in unwrap(model).named_parameters() if n in loaded]
    return {n: loaded[n] for n in order + [n for n in loaded if n not in set(order)]}


class MaskHook:
    """Training hook keeping pruned weights at exactly zero.

    before_step: zero their gradients (so momentum buffers stay clean);
    after_step: zero the weights again (weight decay and momentum may have moved them).

    Masks are cast to the weights' dtype once and applied with one fused multiply per call; the
    cache is rebuilt when a mask tensor in the dict is replaced (GMP swaps them in place). It holds
    the tensors it was built from and compares them by identity: keyed on id(), a mask replaced
    twice between two steps got a freed tensor's id back (200 of 200 tries) and the newly pruned
    weights were not zeroed (review).
    """

    def __init__(self, masks: Masks):
        self.masks = masks
        self._key: list[torch.Tensor] | None = None
        self._params: list[torch.Tensor] = []
        self._factors: list[torch.Tensor] = []

    def _cache(self, model: nn.Module) -> None:
        key = list(self.masks.values())
        if self._key is not None and len(key) == len(self._key) and all(a is b for a, b in zip(key, self._key)):
            return
        params = dict(unwrap(model).named_parameters())
        self._params = [params[n] for n in self.masks]
        self._factors = [m.to(device=p.device, dtype=p.dtype) for m, p in zip(self.masks.values(), self._params)]
        self._key = key

    @torch.no_grad()
    def before_step(self, model: nn.Module) -> None:
        self._cache(model)
        grads = [p.grad for p in self._params if p.grad is not None]
        if len(grads) == len(self._params):
            torch._foreach_mul_(grads, self._factors)
        else:
            mask_grads(model, self.masks)

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        self._cache(model)
        torch._foreach_mul_(self._params, self._factors)

    def on_start(self, model: nn.Module) -> None:
        self._key = None  # the model may have been moved or rebuilt since
        apply_masks(model, self.masks)


def same_or_subset(old: Masks, new: Masks) -> bool:
    """True when every weight alive in ``new`` was alive in ``old`` (masks only shrink)."""
    return all(bool((new[n] & ~old[n]).sum() == 0) for n in new)
