"""The Context every stage shares (config, run directory, runtime, data and its loaders), made
by opening the run directory, and the end of a growing run."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from ptd import paths as P
from ptd.config import ModelConfig, OptimConfig, RunConfig, dump_yaml
from ptd.models import build_model
from ptd.train import checkpoint as ckpt
from ptd.train.distributed import all_sum, barrier, init_distributed, resolve_device
from ptd.train.loop import Runtime, evaluate, fit
from ptd.errors import DivergedError
from ptd.io import file_digest, seal
from ptd.pipeline.lineage import _input_key, check_inputs, is_done, mark_done
from ptd.pipeline.rundir import RunDirError, check_data, check_run_config, open_run_dir
from ptd.pipeline.reuse import copy_reused


@dataclass
class Context:
    """Everything the stages share: config, run dir, runtime, data."""

    cfg: RunConfig
    run_dir: Path
    rt: Runtime
    splits: Any
    log: Callable[[str], None]
    _loaders: dict = field(default_factory=dict)
    _on_device: dict = field(default_factory=dict)
    _noted: set = field(default_factory=set)  # schedules already noted for late milestones
    grown: bool = False  # this run adds work to a finished one: config.yaml is rewritten once it all succeeded
    # A ``jobs`` worker (ptd.jobs): it trains students only, from stages its parent finished first.
    # Any other stage unfinished means the parent is gone (a worker holds no lock of the directory).
    in_worker: bool = False

    @property
    def main(self) -> bool:
        return self.rt.dist.is_main

    @property
    def input_shape(self) -> tuple[int, int, int]:
        from ptd.data import frame_size

        return (self.splits.in_channels, *frame_size(self.splits, self.cfg.data.image_size))

    def split_on_device(self, which: str):
        """Split ``which``, an in-memory one moved to the run's device once: every loader over it
        shares that copy (each TensorLoader moved its own, so a run held the training split on the
        GPU once per student seed, where the memory preflight counts it once). Folder splits load
        from disk: as they are."""
        if which not in self._on_device:
            from ptd.data import Split

            split = getattr(self.splits, which)
            if isinstance(split, Split) and split.x.device != self.rt.device:
                split = Split(split.x.to(self.rt.device), split.y.to(self.rt.device))
            self._on_device[which] = split
        return self._on_device[which]

    def train_loader(self, batch_size: int, seed: int):
        """One loader per (batch size, seed), shared by stages: the split goes to the device once.
        Sharing is safe because ``fit`` calls ``set_epoch`` before every epoch."""
        key = ("train", batch_size, seed)
        if key not in self._loaders:
            from ptd.data import make_loader

            d = self.cfg.data
            self._loaders[key] = make_loader(
                self.split_on_device("train"), batch_size=batch_size, train=True, mean=self.splits.mean, std=self.splits.std,
                device=self.rt.device, seed=seed, augment=d.augment, crop_padding=d.crop_padding, hflip=d.hflip,
                channels_last=self.rt.channels_last, rank=self.rt.dist.rank, world_size=self.rt.dist.world_size,
                workers=d.workers, image_size=d.image_size, with_index=True)
        return self._loaders[key]

    def eval_loader(self, which: str):
        """Validation/test loaders are shared and unsharded: every rank scores the whole split."""
        if which not in self._loaders:
            from ptd.data import make_loader

            split = self.split_on_device(which)
            d = self.cfg.data
            self._loaders[which] = make_loader(split, batch_size=self.cfg.eval_batch_size, train=False, mean=self.splits.mean,
                                               std=self.splits.std, device=self.rt.device, seed=0, augment=False,
                                               channels_last=self.rt.channels_last, workers=d.workers, image_size=d.image_size)
        return self._loaders[which]

    def fit(self, model: nn.Module, optim: OptimConfig, out_dir: Path, seed: int, desc: str, unit: nn.Module | None = None,
            hooks: Sequence[Any] = (), keep: str = "best") -> dict:
        from ptd.train.tensorboard import tensorboard_hook

        # Scalars per stage under tensorboard/<the stage's path in the run>; rank 0 only.
        tb = tensorboard_hook(self.run_dir / P.TENSORBOARD / Path(out_dir).relative_to(self.run_dir), optim.epochs, enabled=self.main)
        hooks = [*hooks, tb] if tb else hooks
        val = self.eval_loader("val")
        key = self.optim_key(optim)
        self._note_late_milestones(key, optim)
        self.sized(model)
        try:
            result = fit(model, self.train_loader(optim.batch_size, seed), val if len(val) else None, optim, self.rt,
                         out_dir=out_dir, unit=unit, hooks=hooks, test_loader=self.eval_loader("test"), desc=desc,
                         optim_key=key, keep=keep, seed=seed)
        except DivergedError as e:
            teacher = self.run_dir / P.TEACHER / P.MODEL
            more = None
            if key == "distill.optim" and is_done(self.run_dir / P.TEACHER) and is_done(self.run_dir / P.PRUNE):
                # A distill.* change is one --from takes: the new --out need not train the teacher or prune again.
                more = f"to reuse this run's trained and pruned teachers there, add --from {self.run_dir}"
            elif key != "teacher.optim" and is_done(self.run_dir / P.TEACHER) and teacher.is_file():
                # The new --out the message asks for need not train the teacher again.
                more = f"to reuse this run's trained teacher there, add --teacher {teacher}"
            if more is None:
                raise
            err = DivergedError(f"{e}; {more}")
            err.every_rank = e.every_rank  # raised alike on every rank under DDP: rank 0 alone prints it
            raise err from None
        result["val_acc"] = result.pop("best_val_acc")
        return result

    def _note_late_milestones(self, key: str, optim: OptimConfig) -> None:
        """Say once per schedule when milestones lie at or past its last epoch (the scheduler steps
        after each epoch, so such a milestone never lowers the rate): typically a shortened
        ``epochs`` with the paper's milestones left in place, e.g. 30 epochs under 60/120/160."""
        late = [m for m in optim.milestones if m >= optim.epochs]
        if late and key not in self._noted:
            self._noted.add(key)
            self.log(f"[{key}] note: milestones {late} are not before its last epoch ({optim.epochs}), so the learning rate "
                     f"never decays {'at them' if len(late) < len(optim.milestones) else 'at all'}; set {key}.milestones below "
                     f"{optim.epochs} if a decay was meant, or [] for a constant rate")

    def optim_key(self, optim: OptimConfig) -> str:
        """The config section a stage's schedule came from, for messages that say what to change."""
        c = self.cfg
        sections = (("teacher.optim", c.teacher.optim), ("prune.retrain", c.prune.retrain), ("distill.optim", c.distill.optim))
        for key, o in sections:
            if optim is o:
                return key
        for key, o in sections:  # a stage's copy with other epochs (the control's rounds)
            if replace(optim, epochs=o.epochs) == o:
                return key
        return "the stage's optim"

    def scores(self, model: nn.Module) -> dict[str, float]:
        val = self.eval_loader("val")
        return {"val_acc": evaluate(model, val, self.rt)["acc"] if len(val) else None,
                "test_acc": evaluate(model, self.eval_loader("test"), self.rt)["acc"]}

    def new_model(self, m: ModelConfig) -> nn.Module:
        return self.sized(build_model(m.arch, num_classes=self.splits.num_classes, in_channels=self.splits.in_channels,
                                      width=m.width, **m.kwargs))

    def sized(self, model: nn.Module) -> nn.Module:
        """``model``, marked with the (height, width) this run feeds it and its outputs' class names,
        which every model file it is saved to records: ``ptd eval`` refuses another size (a teacher trained at 32 px scored
        0.25 at 224 px without a word) and ``ptd export`` of a bare file traces at it."""
        model.ptd_input_size = tuple(self.input_shape[-2:])
        model.ptd_classes = list(self.splits.classes)  # the class of each output: eval refuses data numbered otherwise
        # What an input must be normalised with, per channel on the 0..1 scale: nothing said it, so an
        # exported student could not be fed right by anyone who had not read the data loader (real-data audit).
        model.ptd_normalize = {"mean": [float(v) for v in self.splits.mean], "std": [float(v) for v in self.splits.std]}
        return model

    def write_json(self, path: Path, obj: Any) -> None:
        if self.main:
            ckpt.write_json(path, obj)

    def done(self, d: Path, inputs: Sequence[Path] = ()) -> None:
        if self.main:
            mark_done(d, {_input_key(self.run_dir, p): file_digest(p) for p in inputs})
        barrier()

    def is_done(self, d: Path) -> bool:
        """``d`` finished, and from the files that are there now (else StaleStageError)."""
        if not is_done(d):
            return False
        check_inputs(self.run_dir, d)
        return True


def make_context(cfg: RunConfig, run_dir: Path, log: Callable[[str], None] = print, splits: Any = None,
                 reuse: tuple[Path, Sequence[Path]] | None = None, until: str | None = None,
                 arms: Sequence[str] | None = None, kind: str = "run") -> Context:
    """``splits``: the dataset preflight already loaded (loaded here otherwise). ``reuse``: (the
    ``--from`` run, the stage folders :func:`check_reuse` found) to copy in first. ``until`` and
    ``arms``: the stages the command will run, whose unfinished commits are checked as the
    directory opens (None: every stage's, as a sweep's). ``kind``: "run" or "sweep", recorded in
    env.json for ``preflight.run_kind``."""
    from ptd.data import load_configured
    from ptd.data.base import fingerprint

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    d = init_distributed(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    rt = Runtime(device=resolve_device(cfg.device, d), amp=cfg.amp, channels_last=cfg.channels_last, fast_wgrad=cfg.fast_wgrad, compile=cfg.compile, quiet=cfg.quiet, dist=d)
    dc = cfg.data
    if splits is None:
        splits = load_configured(dc, cfg.seed)
    data = fingerprint(splits, dc.root)
    if reuse is not None:  # before the copy: the stages --from copies were trained on the data it recorded
        check_data(reuse[0], data, f"{reuse[0]} (--from) was made", rt.device)
    # The config first: a changed seed carves another validation split, which check_data called
    # "the data changed ... restore that data", sending the user to a data folder nobody touched.
    check_run_config(cfg, run_dir)
    check_data(run_dir, data, "this run started", rt.device)  # before the directory is opened (and written)
    if reuse is not None:
        failed: BaseException | None = None
        if d.is_main:
            try:
                copy_reused(cfg, reuse[0], run_dir, reuse[1])
                log(f"[from] {', '.join(c.as_posix() for c in reuse[1])} of {reuse[0]} copied into {run_dir}")
            except BaseException as e:  # noqa: BLE001 -- every rank stops together (no hung barrier), rank 0 says why
                failed = e
        if all_sum([0.0 if failed is None else 1.0], rt.device)[0] > 0:
            raise failed if failed is not None else RunDirError(f"--from {reuse[0]}: the copy into {run_dir} failed on rank 0")
    grown = open_run_dir(cfg, run_dir, rt, until, arms, kind, data)
    return Context(cfg, run_dir, rt, splits, log if d.is_main else (lambda s: None), grown=grown)


def finish_growth(ctx: Context) -> None:
    """Once every stage of a growing run returned: config.yaml becomes the grown config (atomic:
    a crash leaves the old one or the new one)."""
    if ctx.grown and ctx.main:
        ckpt.write_text(ctx.run_dir / P.CONFIG, seal(dump_yaml(ctx.cfg)))
