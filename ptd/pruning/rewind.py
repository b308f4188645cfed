"""Weight rewinding (Frankle et al. 2020): the early-training weights IMP resets survivors to.

File contract with the teacher stage: when ``prune.options.rewind_epoch`` = e is set, the teacher
stage writes the teacher's full state dict after e finished epochs (e = 0: the initialization) to
``<teacher_dir>/epoch_{e}.safetensors``. ``rewind_state`` reads it back.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ptd.config import ConfigError
from ptd.paths import snapshot_file
from ptd.pruning.masks import unwrap

if TYPE_CHECKING:
    from ptd.pruning.base import PruneContext


def rewind_path(teacher_dir: str | Path, epoch: int) -> Path:
    return snapshot_file(Path(teacher_dir), epoch)


def rewind_epoch(ctx: "PruneContext") -> int:
    e = getattr(ctx.options, "rewind_epoch", None)
    if e is None:
        raise ConfigError("prune.options.rewind_epoch: required for weight rewinding; set it (e.g. 1) before the teacher is trained so its weights at that epoch are saved, or use rewind: lr")
    return e


def rewind_state(ctx: "PruneContext") -> dict[str, torch.Tensor]:
    """The teacher's state dict at epoch ``prune.options.rewind_epoch``, cast to the model's dtypes.

    One-line ConfigError when the epoch is unset, there is no teacher folder (a user-supplied
    teacher checkpoint has no early weights), or the file is missing or does not fit the model.
    """
    from ptd.train.checkpoint import CheckpointError, read_state_dict

    e = rewind_epoch(ctx)
    if ctx.teacher_dir is None:
        raise ConfigError(f"prune.options.rewind_epoch: weight rewinding needs the teacher's epoch-{e} weights, but the teacher was not trained here (teacher.checkpoint given); use rewind: lr")
    path = rewind_path(ctx.teacher_dir, e)
    if not path.is_file():
        raise ConfigError(f"prune.options.rewind_epoch: {path} not found; the teacher stage saves it only when rewind_epoch={e} is set before training the teacher (retrain it), or use rewind: lr")
    try:
        sd = read_state_dict(path)
    except CheckpointError as err:
        raise ConfigError(f"prune.options.rewind_epoch: {err}") from None
    own = unwrap(ctx.model).state_dict()
    bad = [k for k in own if k not in sd or tuple(sd[k].shape) != tuple(own[k].shape)]
    if bad:
        raise ConfigError(f"prune.options.rewind_epoch: {path} does not fit the teacher ({len(bad)} missing or mis-shaped tensors, first: {bad[0]}); it was saved from another architecture")
    return {k: sd[k].to(own[k].dtype) for k in own}
