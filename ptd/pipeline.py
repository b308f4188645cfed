"""The prune-then-distill pipeline, as resumable stages over one run directory.

    runs/<name>/
      config.yaml  env.json  data.json
      teacher/                model.safetensors  metrics.jsonl  result.json  done
      prune/level_<k>/        model.safetensors  masks.safetensors  sparsity.json  metrics.jsonl  done
      prune/                  result.json  done
      student/                architecture.json  architecture.txt  stats.json  done
      control/round_<k>/      (only with the retrained_teacher arm) the unpruned teacher retrained as long
      distill/<arm>_seed<s>/  model.safetensors  metrics.jsonl  result.json  done
      distill/<arm>-<loss>_seed<s>/   the same for each distill.loss after the first (scratch: once)
      teachers/r<k>/          teacher replicate k >= 1 (teacher.seeds): its own teacher/ prune/ control/ distill/
      tensorboard/<stage path>/  TensorBoard event files of every training stage (tensorboard installed)
      results.json  report.md  report.html

Each stage is a plain function of (context, earlier artifacts) that writes its own directory and a
``done`` marker last. Re-running skips stages that are done and resumes the unfinished one from its
last finished epoch.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import random
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ptd import paths as P
from ptd.config import (ARM_TABLE, REUSE_FREE, with_added_keys, ConfigError, ModelConfig, OptimConfig, PruneConfig, RunConfig, dump_yaml,
                        reuse_free_text, to_dict)
from ptd.models import build_from_spec, build_model, spec_to_text
from ptd.pruning import STRATEGIES, Level, PruneContext, retrain_optim
from ptd.seeding import stream_seed
from ptd.pruning.masks import MaskHook, Masks, apply_masks, count, full_masks, layer_report, load_masks, prunable_weights, require_connected, save_masks, sparsity
from ptd.train import checkpoint as ckpt
from ptd.train.distributed import Dist, all_sum, barrier, init_distributed, resolve_device
from ptd.train.loop import Runtime, cleanup_resume_files, evaluate, fit
from ptd.errors import DivergedError, LayerCollapseError, PreflightError, PtdError, StaleStageError, WorkerDiedError, on_every_rank, one_line
from ptd.io import damaged, dead_writer, file_digest, parses, read_json_object, read_yaml_mapping, seal, writer_tag

STAGES = P.STAGES
# Keys that change how a run is shown, scheduled or checked, not what it computes: may differ on
# resume (and may be missing from a config.yaml written before they were added).
_VOLATILE_KEYS = {"quiet", "threads", "jobs", "device", "eval_batch_size", "data.check_images", "data.workers",
                  "teacher.check_learned"}


class RunDirError(PtdError, ValueError):
    """The run directory holds a different run; one-line message with the fix."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # numpy is a dependency, but seeding must not be the thing that fails
        pass


def is_done(d: Path) -> bool:
    return (d / P.DONE).is_file()


def mark_done(d: Path, inputs: dict[str, str] | None = None) -> None:
    """The stage's last write: when it finished and the digest of every file it was made from."""
    ckpt.write_json(d / P.DONE, {"finished": datetime.now(timezone.utc).isoformat(), "inputs": inputs or {}})


# ---------------------------------------------------------------- lineage
# A finished stage is reused on a re-run only while the files it was made from are the ones there
# now. A stage redone after its folder was deleted (on another thread count its weights differ) or
# a --teacher checkpoint replaced at the same path would otherwise leave later stages built from
# the old files, and the report would compare students of two different teachers.


def sources(model: nn.Module | None) -> tuple[Path, ...]:
    """The files ``model``'s weights (and masks) came from, as the stage that made it set them."""
    return tuple(getattr(model, "ptd_sources", ())) if model is not None else ()


def _input_key(run_dir: Path, path: Path) -> str:
    """Files of the run by their path inside it (the run directory may move); others absolute."""
    path = Path(path).absolute()
    try:
        return path.relative_to(Path(run_dir).absolute()).as_posix()
    except ValueError:
        return str(path)


# env.json's "done_format" (recorded by the session that started the run): 2 = every stage's
# ``done`` is the JSON object mark_done writes. Runs started by older ptd lack it and may hold bare
# markers (a timestamp, or nothing), which are read as "no recorded inputs".
DONE_FORMAT = 2


def strict_done(run_dir: Path) -> bool:
    """Whether every ``done`` of this run must be mark_done's JSON: the run was started by a ptd
    that writes nothing else. (A missing or damaged env.json: not strict; its reader reports it.)"""
    try:
        env = json.loads((Path(run_dir) / P.ENV).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(env, dict) and isinstance(env.get("done_format"), int) and env["done_format"] >= DONE_FORMAT


def recorded_inputs(d: Path, strict: bool = False) -> dict[str, str]:
    """What a finished stage's ``done`` says it was made from; {} for markers of older ptd versions
    (a bare timestamp, or empty): those stages are reused as before. A ``done`` that starts as the
    JSON object ptd writes but does not parse was cut short by something else: reading it as an
    old marker would switch the lineage check off for that stage for good, so it is refused; with
    ``strict`` (:func:`strict_done`: the run never had old markers) so is any ``done`` that is not
    that object, an emptied one included."""
    try:
        text = (d / P.DONE).read_text()
    except (OSError, UnicodeDecodeError):
        return {}
    try:
        obj = json.loads(text)
    except ValueError as e:
        if strict or text.lstrip().startswith("{"):
            why = "empty" if not text.strip() else f"not JSON: {type(e).__name__}: {one_line(e)}"
            raise damaged(d / P.DONE, why) from None
        return {}
    inputs = obj.get("inputs") if isinstance(obj, dict) else None
    if strict and not isinstance(inputs, dict):
        raise damaged(d / P.DONE, "not the record ptd writes (no inputs)")
    return {str(k): str(v) for k, v in inputs.items()} if isinstance(inputs, dict) else {}


def _input_path(run_dir: Path, key: str) -> Path:
    """The file a recorded input key names (the inverse of ``_input_key``)."""
    return Path(key) if os.path.isabs(key) else Path(run_dir) / key


def _changed_inputs(run_dir: Path, recorded: dict[str, str], missing_too: bool) -> list[tuple[Path, str]]:
    out = []
    for key, digest in recorded.items():
        path = _input_path(run_dir, key)
        now = file_digest(path) if path.is_file() else None
        # A file from outside the run (a user's --teacher) that has gone: the stage made from it
        # holds what it took (teacher/model.safetensors), and a user who moved their checkpoints
        # could neither resume nor grow a finished run. Replaced, it is still stale (below).
        if now is None and missing_too and os.path.isabs(key):
            continue
        if now is None and missing_too:
            out.append((path, "is missing now"))
        elif now is not None and now != digest and parses(path):  # a damaged file: its reader says so, precisely
            out.append((path, "has changed since"))
    return out


def _stale(stages: str, path: Path, what: str, fix: str, their: bool = False) -> StaleStageError:
    return StaleStageError(f"{stages} made from {path}, which {what} (the stage that writes it was redone, or the file "
                           f"replaced), so {'their' if their else 'its'} results belong to another run; "
                           f"{fix} to redo them from the file there now, or restore the file, or run into a new --out")


def check_inputs(run_dir: Path, d: Path) -> None:
    """Raise StaleStageError when a file the finished stage ``d`` was made from has changed or gone
    (gone: by now the stage that writes it has run, so it should be there)."""
    changed = _changed_inputs(run_dir, recorded_inputs(d, strict_done(run_dir)), missing_too=True)
    if changed:
        raise _stale(f"{d}: this finished stage was", *changed[0], f"delete it ({d}) and the stages after it")


def check_lineage(run_dir: Path) -> None:
    """Before a re-run writes anything: refuse when any finished stage was made from a file that is
    there now with other contents. (A missing one is left to ``check_inputs`` when that stage comes:
    the stage that writes it may be about to redo it, identically.)"""
    run_dir = Path(run_dir)
    strict = strict_done(run_dir)
    recorded = {m.parent: recorded_inputs(m.parent, strict) for m in sorted(run_dir.rglob(P.DONE))}
    stale = {d: c[0] for d, rec in recorded.items() if (c := _changed_inputs(run_dir, rec, missing_too=False))}
    if not stale:
        return
    first = next(iter(stale.values()))
    # ...and every stage made from a stale stage's files, transitively: all of them must be redone.
    grew = True
    while grew:
        grew = False
        for d, rec in recorded.items():
            if d not in stale and any(s in _input_path(run_dir, key).parents for key in rec for s in stale):
                stale[d], grew = first, True
    # Name whole stages: prune/ rather than each of its levels as well.
    tops = [d for d in stale if not any(o != d and o in d.parents for o in stale)]
    names = ", ".join(d.relative_to(run_dir).as_posix() for d in sorted(tops))
    many = len(tops) > 1
    raise _stale(f"{run_dir}: the finished stage{'s' if many else ''} {names} {'were' if many else 'was'}", *first,
                 f"delete {'those folders' if many else 'that folder'} (in {run_dir})", their=many)


# A JSON object ptd wrote in a run directory; a damaged one is a one-line DamagedFileError.
read_json = read_json_object


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


# ---------------------------------------------------------------- run directory


def environment(cfg: RunConfig, rt: Runtime, kind: str = "run") -> dict[str, Any]:
    import importlib.metadata

    import ptd
    from ptd.measure import cpu_name

    env = {
        "started": datetime.now(timezone.utc).isoformat(),
        "command": " ".join(sys.argv),
        "ptd": getattr(ptd, "__version__", "?"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": importlib.metadata.version("torchvision"),  # the version without importing it (seconds)
        "platform": platform.platform(),
        "processor": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(rt.device),
        "amp_bf16": rt.uses_amp,
        "fast_wgrad": rt.uses_fast_wgrad,
        "compile": rt.compile,
        "world_size": rt.dist.world_size,
        "cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else [],
        "seeds": {"run": cfg.seed, "students": list(cfg.distill.seeds), "teacher_replicates": cfg.teacher.seeds},
        "done_format": DONE_FORMAT,
        "made_by": kind,  # "run" (ptd run and its stage commands) or "sweep": preflight.run_kind reads it
    }
    for mod in ("safetensors", "torch_pruning", "numpy"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:
            env[mod] = None
    return env


def _as_list(x: Any) -> list:
    return [x] if isinstance(x, str) else list(x or [])


def _superset(a: Any, b: Any) -> bool:
    return all(x in _as_list(b) for x in _as_list(a))


def _prefix(a: Any, b: Any) -> bool:
    # The first entry names the first loss's directories (and the sweep's student): it must stay first.
    return _as_list(b)[: len(_as_list(a))] == _as_list(a)


def _growth_rules(old: dict, new: dict) -> dict[str, Callable[[Any, Any], bool]]:
    """{dotted key: (old value, new value) -> True when the new value only adds work}: a finished
    run directory takes such a change and reuses every finished stage (see open_run_dir)."""
    old_losses = _as_list(old.get("distill", {}).get("loss"))
    old_strategies = _as_list(old.get("sweep", {}).get("strategies"))

    def new_sections(a: Any, b: Any, known: list) -> bool:
        # Options may gain a section only for a loss / strategy the run did not have.
        a, b = a or {}, b or {}
        return all(k in b and b[k] == v for k, v in a.items()) and all(k in a or k not in known for k in b)

    return {
        "distill.seeds": _superset,
        "distill.arms": _superset,
        "distill.loss": _prefix,
        "distill.options": lambda a, b: new_sections(a, b, old_losses),
        "teacher.seeds": lambda a, b: (b or 1) >= (a or 1),
        "sweep.strategies": _prefix,
        # More sweep points below the highest one: the IMP run to the highest sparsity (and the
        # student derived from it by default) stay what they were.
        "sweep.sparsities": lambda a, b: _superset(a, b) and max(_as_list(b)) <= max(_as_list(a)),
        "prune.options": lambda a, b: a == b or new_sections(a, b, old_strategies + [old.get("prune", {}).get("strategy")]),
    }


def _same_file(a: Any, b: Any) -> bool:
    """Two spellings of one file: 't.safetensors' given in /x and '/x/t.safetensors' (a relative
    path recorded by an older run resolves against the current folder; a wrong guess only refuses).
    Its content is checked apart: the stage's recorded input hash (run_stage, _changed_inputs)."""
    if a == b:
        return True
    try:
        return bool(a) and bool(b) and os.path.samefile(a, b)
    except (OSError, TypeError, ValueError):
        return False


def _same_teacher(run_dir: Path, was: Any, now: Any) -> bool:
    """``now`` holds the bytes the finished teacher stage recorded for its checkpoint ``was``: the
    user moved or copied their checkpoint, and the run is the same run (a finished run could not
    grow after its --teacher file moved). A teacher stage not finished recorded nothing: False."""
    if not (isinstance(was, str) and isinstance(now, str) and Path(now).is_file()):
        return False
    try:
        digest = recorded_inputs(run_dir / P.TEACHER).get(_input_key(run_dir, Path(was)))
    except PtdError:  # a damaged done: its own check names it
        return False
    return digest is not None and file_digest(Path(now)) == digest


def _recorded_paths(run_dir: Path, old: dict) -> dict:
    """An earlier run's config as it ran: keys added since filled in (``with_added_keys``), and a
    relative teacher.checkpoint (ptd before paths were made absolute on load) replaced by the
    absolute path its teacher stage recorded as its input."""
    old = with_added_keys(old)
    c = (old.get("teacher") or {}).get("checkpoint") if isinstance(old.get("teacher"), dict) else None
    if not isinstance(c, str) or os.path.isabs(c):
        return old
    try:
        inputs = list(json.loads((run_dir / P.TEACHER / P.DONE).read_text()).get("inputs") or {})
    except (OSError, ValueError, AttributeError):
        return old
    if len(inputs) != 1 or Path(inputs[0]).name != Path(c).name:
        return old
    return {**old, "teacher": {**old["teacher"], "checkpoint": inputs[0]}}


# Keys whose values may be spelled differently for one thing; merged into every _diff's rules.
# (config.yaml written before paths were made absolute on load holds them as given: a resume from
# the same folder must still match.)
_EQUIVALENT: dict[str, Callable[[Any, Any], bool]] = {"teacher.checkpoint": _same_file, "data.root": _same_file,
                                                      "data.cache_dir": _same_file}


def _diff(a: Any, b: Any, prefix: str = "", grows: dict[str, Callable[[Any, Any], bool]] | None = None) -> str | None:
    """The first key whose values differ (``grows``: keys whose change is accepted when its rule
    says the new value only adds work), as "key: old there, new now"; None when none."""
    if grows and prefix in grows:
        return None if grows[prefix](a, b) else f"{prefix}: {a!r} there, {b!r} now"
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            key = f"{prefix}.{k}" if prefix else k
            if key in _VOLATILE_KEYS:
                continue
            d = _diff(a.get(k), b.get(k), key, grows)
            if d:
                return d
        return None
    return None if a == b else f"{prefix}: {a!r} there, {b!r} now"


def make_dir(d: Path, what: str) -> None:
    """``mkdir -p d``; a refusal of the file system is one line naming the path. (preflight's
    check_out_dir and check_run_tree make this unreachable for what they can see up front.)"""
    try:
        Path(d).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        where = e.filename if e.filename is not None else d
        raise PreflightError(f"{what} cannot be created ({e.strerror or type(e).__name__}: {where}); make the path a "
                             f"folder this user can write, or pass --out a new directory") from None


def check_run_config(cfg: RunConfig, run_dir: Path) -> bool:
    """Whether ``run_dir`` takes this run: new or empty (False), the same run (False), or one
    this run only adds work to (True: it grows); RunDirError otherwise. Reads only."""
    cfg_path = run_dir / P.CONFIG
    if cfg_path.is_file():
        old = read_yaml_mapping(cfg_path, fix=f"restore it, or run into a new --out (or delete {run_dir} to start over)")
        old = _recorded_paths(run_dir, old)
        new = to_dict(cfg)
        foreign = sorted(str(k) for k in old if k not in new)
        if foreign or "teacher" not in old:  # another tool's config.yaml: "a different config (amp: ...)" would mislead
            why = f"unknown top-level key {foreign[0]!r}" if foreign else "no teacher section"
            raise RunDirError(f"{run_dir} holds a {P.CONFIG} that is not a ptd run's ({why}), so it is not a ptd run "
                              f"directory; pass --out a new or empty directory")
        same = {**_EQUIVALENT, "teacher.checkpoint": lambda a, b: _same_file(a, b) or _same_teacher(run_dir, a, b)}
        d = _diff(old, new, grows={**_growth_rules(old, new), **same})
        if d:
            raise RunDirError(f"{run_dir} holds a run with a different config ({d}); only more distill.seeds, distill.arms, "
                              f"distill.loss, sweep points or teacher.seeds can grow a finished run; pass --out to a new "
                              f"directory, or delete {run_dir} to start over")
        return _diff(old, new, grows=same) is not None
    if run_dir.exists() and any(not ckpt.is_writer_temp(p) for p in run_dir.iterdir()):
        # (Only a writer temporary in it: a kill in the middle of writing config.yaml, this run's.)
        raise RunDirError(f"{run_dir} exists and is not a ptd run directory (no config.yaml); pass --out to a new or empty directory")
    return False


# The file each finished stage returns when it is skipped (run_stage's result_file; a prune
# level's record is its sparsity.json).
def _record_file(d: Path) -> str:
    return P.STATS if d.name == P.STUDENT else P.SPARSITY if d.name.startswith("level_") else P.RESULT


def _record_check(d: Path) -> tuple[Any, tuple[str, ...]]:
    """What a finished stage in ``d`` must hold: a check of its record's keys and types (those the
    pipeline and the report read back from it) and the files besides it that a re-run loads; by
    the folder's place in the layout (ptd.paths). (None, ()) for a folder of no known kind."""
    from ptd.report import ACC, AMOUNT, COUNT, obj, items, num, text

    cost = {"epochs": AMOUNT, "steps": AMOUNT, "wall_s": AMOUNT}
    acc = num(0, 1, null=True)
    trained = obj({"test_acc": ACC, "val_acc?": acc, **cost})
    counts = obj({"params": COUNT, "flops": COUNT})
    if d.name == P.TEACHER or d.name.startswith("round_"):
        return trained, (P.MODEL,)
    if d.name.startswith("level_"):
        return obj({"level": COUNT, "sparsity": ACC, "test_acc?": acc, "val_acc?": acc}), (P.MODEL, P.MASKS)
    if d.name == P.STUDENT:
        return obj({"spec": obj({"arch": text()}), "student": counts, "teacher": counts}), (P.ARCHITECTURE,)
    if d.name == P.CONTROL:
        return obj({"rounds": COUNT, "test_acc": ACC, "val_acc?": acc, **cost}), ()
    if d.parent.name == P.DISTILL:
        return obj({"arm": text(), "seed": num(integer=True), "loss?": text(null=True), "test_acc": ACC, "val_acc?": acc,
                    **cost}), (P.MODEL,)
    if d.name == P.PRUNE or d.parent.name == P.PRUNE:  # a run's pruning, or one strategy's of a sweep
        level = obj({"level": COUNT, "sparsity": ACC, "test_acc": acc, "params_nonzero?": COUNT})
        run = obj({"strategy": text(), "final_level": COUNT, "sparsity": ACC, "levels": items(level), **cost})

        def pruning(v: Any, key: str) -> None:
            run(v, key)
            obj({"params_nonzero": COUNT})(v["levels"][-1], f"levels[{len(v['levels']) - 1}]")  # the report's figure

        return pruning, ()
    return None, ()


def check_finished_stages(run_dir: Path, under: Sequence[Path] | None = None) -> None:
    """Before a re-run writes anything (env.json included): every file of a finished stage that a
    re-run reads back (its record, its weights and masks) still parses, and every writer temporary
    left by a kill can be removed. Otherwise the stage refuses only when its turn comes, after this
    session was recorded and perhaps after other stages trained. ``under``: only the stages in
    these folders (``--from``: the ones copied)."""
    run_dir = Path(run_dir)
    markers = sorted(run_dir.rglob(P.DONE)) if under is None else sorted(m for u in under for m in Path(u).rglob(P.DONE))
    for marker in markers:
        d = marker.parent
        if d == run_dir or not marker.is_file():
            continue
        record = d / _record_file(d)
        data = read_json(record)  # DamagedFileError, the same line the stage would give (a missing record too)
        check, needs = _record_check(d)
        if check is not None:  # readable, but not the record ptd wrote: a re-run would fail on a key mid-way
            from ptd.report import Invalid

            try:
                check(data, "")
            except Invalid as e:
                raise damaged(record, f"not the record ptd writes: {e.kind}: {e}") from None
        for name in needs:
            if not (d / name).is_file():
                raise damaged(d / name, "missing, though its stage is finished")
        if d.name == P.STUDENT and read_json(d / P.ARCHITECTURE) != data["spec"]:
            # The distillations record architecture.json as what they were made from and build
            # stats.json's spec: the two must be one student, or an edit of one goes unnoticed.
            raise damaged(record, f"its student spec is not the one in {P.ARCHITECTURE} beside it (one of them was edited)")
        for f in sorted(d.glob("*.json")):  # every other JSON ptd wrote there (architecture.json: `ptd eval`, export)
            if f != record and f.is_file():
                read_json(f)
        for f in sorted(d.glob("*.safetensors")):
            if f.is_file() and not parses(f):
                raise damaged(f, "not the safetensors file ptd wrote: its header or size is wrong")
    for tmp in sorted(run_dir.rglob(".*.tmp")) if under is None else ():  # (a copy leaves them behind)
        if ckpt.is_writer_temp(tmp) and not os.access(tmp.parent, os.W_OK | os.X_OK):
            raise PreflightError(f"{tmp}: a temporary left by a killed ptd, in a folder this user cannot write, so it cannot "
                                 f"be removed; give this user permission on {tmp.parent}, or delete the file")


def _stage_runs(cfg: RunConfig, rel: Path, until: str | None, arms: Sequence[str] | None) -> bool:
    """Whether a command that stops after ``until`` for ``arms`` (default: the config's) trains in
    the stage folder ``rel`` (relative to the run directory). ``until`` None (a sweep, whose
    students are named by sweep point) or a folder ptd does not know: True."""
    if until is None:
        return True
    parts = rel.parts[2:] if rel.parts[:1] == (P.REPLICATES,) else rel.parts  # teachers/r<k>/...
    last = {P.TEACHER: "teacher", P.PRUNE: "prune", P.CONTROL: "distill", P.DISTILL: "distill"}.get(parts[0] if parts else "")
    if last is None:
        return True
    if P.STAGES.index(until) < P.STAGES.index(last):
        return False
    arms = tuple(arms or cfg.distill.arms)
    if parts[0] == P.CONTROL:
        return any(ARM_TABLE[a].teacher == "retrained" for a in arms)
    if parts[0] == P.DISTILL and len(parts) > 1:  # <arm>_seed<s> or <arm>-<loss>_seed<s>
        return any(parts[1].startswith((f"{a}_seed", f"{a}-")) for a in arms)
    return True


def data_change(run_dir: Path, fp: dict[str, Any], what: str = "this run started") -> str | None:
    """Why the data a run directory recorded (data.json) is not the data loaded now, as one line, or
    None (the same, or a directory from before the record)."""
    rec = Path(run_dir) / P.DATA
    if not rec.is_file():
        return None
    have = read_json(rec)
    if "file_sizes" not in have:  # recorded by a ptd from before file sizes were: compare the rest
        fp = {k: v for k, v in fp.items() if k != "file_sizes"}
    if have == fp:
        return None
    counts = [f"{k} {have.get('images', {}).get(k)} then, {v} now" for k, v in fp["images"].items()
              if have.get("images", {}).get(k) != v]
    how = ("; ".join(counts) if counts else "the same image counts, other images or labels" if have.get("sha256") != fp.get("sha256")
           else "the same image paths and labels, other file sizes: images rewritten in place")
    return (f"{run_dir}: the data changed since {what} ({how}): its finished stages were trained on the data then; "
            f"restore that data, or pass --out a new directory")


def check_data(run_dir: Path, fp: dict[str, Any], what: str, device: torch.device) -> None:
    """data_change, agreed by every process: under torchrun each machine may read its own copy, and a
    refusal one rank alone raised left the others waiting at the next barrier (review)."""
    why = data_change(run_dir, fp, what)
    if all_sum([0.0 if why is None else 1.0], device)[0] > 0:
        raise RunDirError(why or f"{run_dir}: the data another process of this torchrun run reads changed since {what}; "
                                 f"its own line says how")


def open_run_dir(cfg: RunConfig, run_dir: Path, rt: Runtime, until: str | None = None, arms: Sequence[str] | None = None,
                 kind: str = "run", data: dict[str, Any] | None = None) -> bool:
    """Create the run directory, or check that an existing one holds this same run (resume) or
    one this run only adds work to (more seeds, arms, losses, sweep points, teacher replicates:
    the run grows, every finished stage is reused). Returns whether it grows.

    Every check comes before the first write: config.yaml and env.json are written only once the
    directory's config, its finished stages' files and env.json itself have passed, so a refused
    re-run or growth leaves the directory as it was (and the original command still works on it).
    A growth's config.yaml is written by :func:`finish_growth`, after every stage succeeded: a
    growth that fails in training (divergence, collapse, out of memory, a kill) leaves the old
    config, so both the original command and the grown one still take the directory.
    preflight.check_out_dir / check_run_tree have checked its folders."""
    cfg_path = run_dir / P.CONFIG
    grown = check_run_config(cfg, run_dir)
    # Every rank has checked before any rank writes: otherwise a slow rank could find the
    # directory rank 0 just made, without its config.yaml yet, and refuse it.
    barrier()
    held, refused = True, None
    if rt.dist.is_main:
        try:
            make_dir(run_dir, f"run directory {run_dir}")  # with any missing parents, like mkdir -p (docs/resume.md)
            held = ckpt.lock_dir(run_dir)
        except OSError as e:
            refused = PreflightError(f"run directory {run_dir} cannot be locked ({e.strerror}); give this user permission "
                                     f"to read it, or pass --out another folder")
        except PtdError as e:
            refused = e
        held = held and refused is None
    if all_sum([0.0 if held else 1.0], rt.device)[0] > 0:  # every rank refuses together (no hung barrier)
        if refused is not None:
            raise refused
        raise RunDirError(f"{run_dir} is in use by another ptd process (it holds the directory's lock); wait for it to "
                          f"finish or stop it, or pass --out to another directory")
    env_path = run_dir / P.ENV
    old_env = None
    try:
        if cfg_path.is_file():  # under the lock: no other ptd is redoing a stage meanwhile; every rank reads alike
            check_lineage(run_dir)
            check_finished_stages(run_dir)
            # An unfinished stage's commit: refused now, not when its turn comes. Only the stages this
            # command trains: `ptd train` beside a distill stage a 2-process run left was refused for it.
            for r in sorted(run_dir.rglob(P.RESUME)):
                if r.is_file() and not is_done(r.parent) and _stage_runs(cfg, r.parent.relative_to(run_dir), until, arms):
                    ckpt.check_resume(r.parent)
        if rt.dist.is_main and env_path.is_file():  # read before config.yaml is rewritten: a damaged one refuses first
            old_env = read_json_object(env_path, fix=f"delete it (it records the machines of earlier sessions) and run again")
    except BaseException:
        if rt.dist.is_main:
            ckpt.unlock_dir(run_dir)
        raise
    if rt.dist.is_main:
        try:
            # Nothing else writes here now: a writer temporary left by a kill is garbage.
            ckpt.remove_stale_temps(run_dir)
            if not cfg_path.is_file():  # atomic: a crash leaves no config or the whole one
                ckpt.write_text(cfg_path, seal(dump_yaml(cfg)))
            if data is not None and (not (run_dir / P.DATA).is_file()  # the first session's (or, before the record, this one's)
                                     or ("file_sizes" in data and "file_sizes" not in read_json(run_dir / P.DATA))):
                # A record from before file sizes, which check_data found equal on the rest: given them
                # now, or the directory never gained that protection (review).
                ckpt.write_json(run_dir / P.DATA, data)
            env = environment(cfg, rt, kind)
            if old_env is not None:  # keep the first session's record, add this one's
                env = {**old_env, "resumed": old_env.get("resumed", []) + [env]}
            ckpt.write_json(env_path, env)
        except BaseException:
            ckpt.unlock_dir(run_dir)
            raise
    barrier()
    return grown


def finish_growth(ctx: Context) -> None:
    """Once every stage of a growing run returned: config.yaml becomes the grown config (atomic:
    a crash leaves the old one or the new one)."""
    if ctx.grown and ctx.main:
        ckpt.write_text(ctx.run_dir / P.CONFIG, seal(dump_yaml(ctx.cfg)))


# ---------------------------------------------------------------- --from: another run's teacher
# A question about the student side (another student.round_to, a named student, other distill
# settings) asked of the same pruned teacher: a finished run directory takes only growth (more
# seeds, arms, losses), so such a run goes into a new directory, and ``--from RUN`` copies RUN's
# finished teacher, pruning and control there instead of training them again. That is the same
# result only where those stages are what this config computes, so every key outside student,
# distill, name and sweep (and those a resume may change, _VOLATILE_KEYS) must be RUN's.

REUSED_STAGES = (P.TEACHER, P.PRUNE, P.CONTROL)


def check_reuse(cfg: RunConfig, src: str | Path, run_dir: str | Path) -> list[Path] | None:
    """The stage folders of ``src`` (relative to it) that ``--from src`` copies into ``run_dir``;
    None when ``run_dir`` already holds a run (a re-run after a kill resumes it: nothing to copy).
    A one-line PreflightError (or the damaged / stale file's error) where ``src`` cannot serve.
    Reads only."""
    src, run_dir = Path(src), Path(run_dir)
    a, b = src.resolve(), run_dir.resolve()
    if a == b or a in b.parents or b in a.parents:
        raise PreflightError(f"--from {src} and --out {run_dir} overlap; pass --out a new directory outside the run it reuses "
                             f"(more seeds, arms or losses grow a run in place: re-run it with its own --out, without --from)")
    if (run_dir / P.CONFIG).is_file():
        return None
    check_run_config(cfg, run_dir)  # a non-empty folder that is not a run: refused as without --from, before any copy
    if not src.is_dir() or not (src / P.CONFIG).is_file():
        raise PreflightError(f"--from {src}: not a ptd run directory (no {P.CONFIG}); give the run directory whose teacher "
                             f"and pruning to reuse")
    old = _recorded_paths(src, read_yaml_mapping(src / P.CONFIG, fix="restore it, or run without --from"))
    new = to_dict(cfg)
    d = _diff({k: v for k, v in old.items() if k not in REUSE_FREE}, {k: v for k, v in new.items() if k not in REUSE_FREE},
              grows={"teacher.seeds": lambda x, y: True, **_EQUIVALENT})  # replicates it lacks are trained, extra ones left
    if d:
        raise PreflightError(f"--from {src}: its teacher and pruning were made with another config ({d}); --from reuses them "
                             f"only when every key outside {reuse_free_text()} is the same: set it back, or run "
                             f"without --from")
    copies = [(P.replicate_root(src, r) / name).relative_to(src) for r in range(cfg.teacher.seeds) for name in REUSED_STAGES
              if (P.replicate_root(src, r) / name / P.DONE).is_file()]
    if Path(P.TEACHER) not in copies:
        raise PreflightError(f"--from {src}: it has no finished teacher to reuse; finish it first (ptd train with --out {src}), "
                             f"or run without --from")
    _check_readable(src, copies)
    check_finished_stages(src, [src / c for c in copies])  # the records and weights parse
    strict = strict_done(src)
    for c in copies:  # and every file they were made from is the one there now
        for m in sorted((src / c).rglob(P.DONE)):
            changed = _changed_inputs(src, recorded_inputs(m.parent, strict), missing_too=True)
            if changed:
                raise _stale(f"--from {src}: its finished stage {m.parent} was", *changed[0],
                             f"re-run {src} with its own command")
    return copies


def _read_lock_source(src: Path) -> int | None:
    """``--from src``'s shared lock, held from its checks to the end of the copy: a ptd running in
    ``src`` (resuming it, redoing a stage made stale) could otherwise rewrite a stage between the
    check of its files and their copy, or halfway through it. Other ``--from`` copies of ``src``
    share the lock. None where ``src`` is no folder (check_reuse names that)."""
    if not src.is_dir():
        return None
    try:
        fd = ckpt.read_lock_dir(src)
    except OSError:
        return None  # unreadable: check_reuse's one line says so
    if fd is None:
        raise RunDirError(f"--from {src}: another ptd process is running in it (it holds the directory's lock), and its "
                          f"stages may change under the copy; wait for it to finish (or stop it), then run this again")
    return fd


def _check_readable(src: Path, copies: Sequence[Path]) -> None:
    """Every file and folder ``--from`` copies can be read by this user: otherwise the copy would
    stop halfway at the first one, named as a list of errors (shutil.Error)."""
    for c in copies:
        for d in (src / c, src / P.TENSORBOARD / c):
            if not d.is_dir():
                continue
            for root, dirs, files in os.walk(d, onerror=lambda e: _unreadable(src, Path(e.filename or d))):
                for n in dirs:
                    if not os.access(Path(root) / n, os.R_OK | os.X_OK):
                        _unreadable(src, Path(root) / n)
                for n in files:
                    if not ckpt.is_writer_temp(n) and not os.access(Path(root) / n, os.R_OK):
                        _unreadable(src, Path(root) / n)


def _unreadable(src: Path, path: Path) -> None:
    raise PreflightError(f"--from {src}: {path} cannot be read by this user, so it cannot be copied; give this user read "
                         f"permission on it (chmod -R u+rX {src}), or run without --from")


def _reuse_temps(run_dir: Path) -> list[Path]:
    """Folders ``copy_reused`` left next to ``run_dir`` when killed (their process is gone)."""
    import glob

    return [t for t in run_dir.parent.glob(f".{glob.escape(run_dir.name)}.from-*.tmp")  # (a name may hold [, * or ?)
            if dead_writer(t.name[len(run_dir.name) + 7:-4])]


def copy_reused(cfg: RunConfig, src: str | Path, run_dir: str | Path, copies: Sequence[Path]) -> None:
    """Copy ``copies`` (from :func:`check_reuse`) and their TensorBoard mirrors from ``src`` into
    ``run_dir`` with this run's config.yaml and reused.json (where from, which stages). Atomic: the
    copy is made in a sibling folder renamed to ``run_dir`` (new, or empty) at the end, so a kill
    leaves ``run_dir`` as it was and the same command copies again (the killed copy's folder is
    removed then). ``src``'s own files are only read."""
    import shutil

    src, given = Path(src), Path(run_dir)
    # An --out that is a link to an (empty) folder: the copy replaces the folder it points to and
    # the link stays (os.replace over the link itself would fail: "Not a directory").
    run_dir = Path(os.path.realpath(given)) if given.is_symlink() else given
    make_dir(run_dir.parent, f"the folder of run directory {run_dir}")
    for t in _reuse_temps(run_dir):
        shutil.rmtree(t, ignore_errors=True)
    tmp = run_dir.parent / f".{run_dir.name}.from-{writer_tag()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)

    def skip(folder: str, names: list[str]) -> list[str]:  # a half-written file of a ptd killed (or running) there
        return [n for n in names if ckpt.is_writer_temp(n)]

    try:
        for c in copies:
            shutil.copytree(src / c, tmp / c, ignore=skip)
            if (src / P.TENSORBOARD / c).is_dir():
                shutil.copytree(src / P.TENSORBOARD / c, tmp / P.TENSORBOARD / c, ignore=skip)
        ckpt.write_json(tmp / P.REUSED, {"from": str(src.resolve()), "stages": [c.as_posix() for c in copies],
                                         "copied": datetime.now(timezone.utc).isoformat()})
        ckpt.write_text(tmp / P.CONFIG, seal(dump_yaml(cfg)))  # last: with it, tmp is a run directory
        if run_dir.is_dir():
            ckpt.remove_stale_temps(run_dir)  # empty but for a writer temporary (check_run_config took it)
            run_dir.rmdir()
        os.replace(tmp, run_dir)
    except shutil.Error as e:  # copytree's list of (source, destination, why), one per file it could not copy
        shutil.rmtree(tmp, ignore_errors=True)
        errors = e.args[0] if e.args and isinstance(e.args[0], list) and e.args[0] else [(src, tmp, str(e))]
        path, _, why = errors[0]
        more = f"; {len(errors) - 1} more" if len(errors) > 1 else ""
        raise RunDirError(f"--from {src}: {path} could not be copied ({why}{more}); {given} is left as it was: make it readable "
                          f"(chmod -R u+rX {src}) or free disk space, or run without --from") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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


# ---------------------------------------------------------------- stages


class _SaveAtEpoch:
    """Teacher-stage hook: keep the weights after epoch ``epoch`` (for IMP weight rewinding; 0: the
    initialization, saved before the first epoch). Idempotent: a re-run of the epoch (after a kill
    before its commit) rewrites the same file; a resumed run past that epoch never touches it."""

    def __init__(self, model: nn.Module, epoch: int, path: Path, main: bool):
        self.model, self.epoch, self.path, self.main = model, epoch, path, main
        self.resumed = False
        self.resume_key = f"snapshot_epoch_{epoch}"  # a sweep may keep several epochs: one state each

    def on_start(self, model: nn.Module) -> None:
        # on_start also runs after a resume, with the committed (trained) weights: not the init. A
        # hook added by a grown run finds no state of its own in the commit to say so, so a commit
        # in the folder says it too (stage_teacher saves the init before such a fit).
        if self.epoch == 0 and not self.resumed and self.main and not (self.path.parent / ckpt.RESUME_FILE).exists():
            ckpt.save_model(self.path, self.model)

    def end_epoch(self, epoch: int, metrics: dict) -> None:
        if epoch + 1 == self.epoch and self.main:
            ckpt.save_model(self.path, self.model)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.resumed = True  # fit restores a commit: at least one epoch is behind us


def snapshot_epochs(cfg: RunConfig, strategies: Sequence[str] | None = None) -> tuple[int, ...]:
    """The teacher epochs whose weights the pruning strategies of this run need (weight rewinding),
    as the strategies declare them, in order. ``strategies``: a sweep's, each with its section of
    prune.options; default: the run's one strategy with all of prune.options. Every one is kept:
    a sweep of two weight-rewinding strategies at epochs 2 and 5 kept only 2, and the second
    strategy failed for want of epoch 5 after the teacher had trained."""
    from ptd.pruning import SPECS, options_for, strategy_options

    if strategies is None:
        wanted = [(cfg.prune.strategy, dict(cfg.prune.options))]
    else:
        wanted = [(st, options_for(cfg.prune.options, st)) for st in strategies]
    epochs = {SPECS.get(st).snapshot_epoch(strategy_options(st, opts)) for st, opts in wanted}
    return tuple(sorted(e for e in epochs if e is not None))  # 0 is an epoch too: the initialization


def _epochs(n: int) -> str:
    return f"{n} epoch" + ("" if n == 1 else "s")


def run_stage(ctx: Context, d: Path, compute: Callable[[], dict], *, result_file: str = P.RESULT,
              cleanup: bool = True, inputs: Sequence[Path] | Callable[[dict], Sequence[Path]] = (),
              student: bool = False) -> tuple[dict, bool]:
    """The sequence every stage follows, once: skip if done (its result read back), else make the
    directory, ``compute()`` (a ``fit`` inside resumes from the directory's last committed epoch),
    write the result, mark done, and only then drop the resume files. Returns (result, computed now).

    ``inputs``: the files the stage is made from (earlier stages' weights, masks, stats; a user's
    checkpoint), or a function of the stage's result giving them (files the stage itself chose,
    such as the pruning's final level). ``done`` records their digests, and a finished stage whose
    inputs have changed since is refused (StaleStageError) rather than reused. ``student``: a
    distillation, the one stage a ``jobs`` worker (``ctx.in_worker``) may compute."""
    if ctx.is_done(d):
        if cleanup:  # a kill between done and the removal left the resume commit behind
            cleanup_resume_files(d)
        # A re-run said nothing of what it skipped, so a resume looked like a run that forgot a stage
        # (new-user audit).
        ctx.log(f"[reused] {_input_key(ctx.run_dir, d)}: finished earlier")
        return read_json(d / result_file), False
    if ctx.in_worker and not student:
        # An orphaned worker of a killed run (or one whose directory was deleted and started over)
        # would otherwise train the teacher or pruning there, unlocked, beside the user's re-run.
        raise RunDirError(f"{d} is not finished, and a worker trains students only: the run that started it is gone")
    if ctx.main:
        make_dir(d, f"the stage folder {d}")
    result = compute()
    ctx.write_json(d / result_file, result)
    ctx.done(d, inputs(result) if callable(inputs) else inputs)
    if cleanup:
        cleanup_resume_files(d)
    return result, True


def clone_model(ctx: Context, model: nn.Module) -> nn.Module:
    """A copy of ``model`` (same architecture and weights) on the run's device, to train apart."""
    copy = ctx.sized(build_from_spec(model.ptd_spec))
    copy.load_state_dict(model.state_dict())
    return ctx.rt.prepare(copy)


def teacher_seed(cfg: RunConfig, replicate: int = 0) -> int:
    """The data-order seed of teacher replicate ``replicate``'s training, pruning and control."""
    return stream_seed(cfg.seed, "teacher", replicate)


def student_seed(cfg: RunConfig, seed: int, replicate: int = 0) -> int:
    """The data-order seed of student ``seed`` under teacher replicate ``replicate``: the same in
    every arm and loss, so arms pair seed by seed within a replicate."""
    return stream_seed(cfg.seed, "student", seed, epoch=replicate)


def stage_teacher(ctx: Context, snapshot: Sequence[int] | str = "auto", replicate: int = 0) -> tuple[nn.Module, dict]:
    """Train (or load) teacher replicate ``replicate``; ``snapshot``: also keep its weights after
    each of these epochs ("auto": what the run's pruning strategy declares it needs)."""
    cfg, d = ctx.cfg, P.replicate_root(ctx.run_dir, replicate) / P.TEACHER
    model = ctx.new_model(cfg.teacher.model)

    def compute() -> dict:
        nonlocal model
        seed_everything(stream_seed(cfg.seed, "teacher_init", replicate))
        model = ctx.new_model(cfg.teacher.model)
        if cfg.teacher.checkpoint:
            ctx.log(f"[teacher] loading {cfg.teacher.checkpoint}")
            ckpt.load_into(model, cfg.teacher.checkpoint, "teacher")
            model = ctx.rt.prepare(model)
            result = {**ctx.scores(model), "source": str(cfg.teacher.checkpoint), "epochs": 0, "steps": 0, "wall_s": 0.0}
            if ctx.main:
                ckpt.save_model(d / P.MODEL, model)
        else:
            model = ctx.rt.prepare(model)
            ctx.log(f"[teacher] training {cfg.teacher.model.arch} for {_epochs(cfg.teacher.optim.epochs)}")
            hooks = []
            epochs = snapshot_epochs(cfg) if snapshot == "auto" else tuple(snapshot)
            if 0 in epochs and ctx.main and not P.snapshot_file(d, 0).exists():
                # The initialization, from the seed, before fit may restore trained weights: a sweep
                # grown mid-teacher by a strategy that rewinds to 0 got the trained weights as epoch 0.
                ckpt.save_model(P.snapshot_file(d, 0), model)
            for e in epochs:
                hooks.append(_SaveAtEpoch(model, int(e), P.snapshot_file(d, int(e)), ctx.main))
            result = ctx.fit(model, cfg.teacher.optim, d, teacher_seed(cfg, replicate), "teacher", hooks=hooks)
        result["params"] = sum(p.numel() for p in model.parameters())
        return result

    # A user's checkpoint is the teacher stage's input: replaced at the same path, the stage is stale.
    result, fresh = run_stage(ctx, d, compute, inputs=[Path(cfg.teacher.checkpoint)] if cfg.teacher.checkpoint else [])
    if not fresh:
        ckpt.load_into(model, d / P.MODEL, "teacher")
        model = ctx.rt.prepare(model)
    else:
        ctx.log(f"[teacher] test acc {result['test_acc']:.4f}")
    model.ptd_sources = (d / P.MODEL,)
    return model, result


def stage_prune(ctx: Context, teacher: nn.Module, teacher_result: dict, prune_cfg: PruneConfig | None = None,
                d: Path | None = None, replicate: int = 0) -> tuple[nn.Module, Masks, dict]:
    """Prune a copy of ``teacher`` by ``prune_cfg`` (default: the run's) into ``d`` (default: the
    replicate's prune/)."""
    cfg = replace(ctx.cfg, prune=prune_cfg) if prune_cfg is not None else ctx.cfg
    root = P.replicate_root(ctx.run_dir, replicate)
    d = d or root / P.PRUNE
    seed = teacher_seed(cfg, replicate)
    model = clone_model(ctx, teacher)
    masks = {n: m.to(ctx.rt.device) for n, m in full_masks(prunable_weights(model, cfg.prune.exclude_first, cfg.prune.exclude_last)).items()}
    if not masks:
        raise ConfigError("prune: the teacher has no prunable Conv/Linear weights (check prune.exclude_first / prune.exclude_last)")

    def level_dir(k: int) -> Path:
        return P.level_dir(d, k)

    def level_files(k: int) -> tuple[Path, ...]:
        """Level k's weights and masks, the inputs of level k + 1 (IMP's next round starts from them):
        a level redone differently must not leave the levels after it standing."""
        ld = level_dir(k)
        return (ld / P.MODEL, ld / P.MASKS) if k > 0 and (ld / P.MODEL).is_file() else ()

    def connected(mk: Masks, where: str) -> None:
        try:
            require_connected(mk, where)
        except LayerCollapseError as e:
            # A lower target is another config, so another --out: it need not train the teacher again.
            t = root / P.TEACHER / P.MODEL
            hint = f"; to reuse this run's trained teacher there, add --teacher {t}" if is_done(root / P.TEACHER) and t.is_file() else ""
            raise LayerCollapseError(f"{e}{hint}") from None

    def train(m: nn.Module, mk: Masks, name: str, optim: OptimConfig, hooks: Sequence[Any]) -> dict:
        connected(mk, f"prune {name}")  # before its epochs are spent on a network that cannot learn
        out = d / name
        if ctx.main:
            out.mkdir(parents=True, exist_ok=True)
        # Dropout draws from torch's global RNG: unseeded, a level's first epoch depended on what the
        # session did before it (a teacher trained, or reused), and a resumed mobilenetv2 teacher was
        # pruned to other weights (review). A resume restores the commit's RNG over this.
        seed_everything(stream_seed(cfg.seed, f"prune {name}", replicate))
        r = ctx.fit(m, optim, out, seed, f"prune {name}", hooks=[MaskHook(mk), *hooks], keep=cfg.prune.retrain_checkpoint)
        # fit reloads the checkpoint it kept; apply the masks once more for exactness under GMP,
        # whose masks may have shrunk after a best-validation checkpoint was written.
        apply_masks(m, mk)
        return r  # its resume commit stays until save_level has written the level's done

    def save_level(level: Level) -> None:
        connected(level.masks, f"prune level_{level.index}")  # GMP's masks are final only now
        ld = level_dir(level.index)
        alive, total = count(level.masks)
        info = {"level": level.index, "sparsity": level.sparsity, "alive": alive, "total": total, **level.metrics,
                "layers": layer_report(level.masks)}
        if ctx.main:
            ld.mkdir(parents=True, exist_ok=True)
            ckpt.save_model(ld / P.MODEL, model)
            save_masks(ld / P.MASKS, level.masks)
            ckpt.write_json(ld / P.SPARSITY, info)
        ctx.done(ld, [*sources(teacher), *level_files(level.index - 1)])
        cleanup_resume_files(ld)  # crash consistency: only after done (else a kill retrains the level)

    def load_level(k: int) -> Level:
        ld = level_dir(k)
        cleanup_resume_files(ld)  # a kill between the level's done and the removal left it behind
        ckpt.load_into(model, ld / P.MODEL, "pruned teacher")
        mk = {n: t.to(ctx.rt.device) for n, t in load_masks(ld / P.MASKS, model).items()}
        info = read_json(ld / P.SPARSITY)
        metrics = {k2: v for k2, v in info.items() if k2 not in ("level", "sparsity", "alive", "total", "layers")}
        return Level(k, mk, metrics)

    def compute() -> dict:
        nonlocal masks
        retrain_loader = ctx.train_loader(cfg.prune.retrain.batch_size, seed)

        def batches(n: int) -> list:
            out = []
            retrain_loader.set_epoch(0)  # the same batches on a re-run (SNIP's scores must not change on resume)
            for i, b in enumerate(retrain_loader):
                if i >= n:
                    break
                out.append(b)
            return out

        example = torch.zeros((1, *ctx.input_shape), device=ctx.rt.device)
        pctx = PruneContext(model=model, masks=masks, cfg=cfg.prune, train=train, evaluate=ctx.scores, batches=batches,
                            level_done=lambda k: ctx.is_done(level_dir(k)), load_level=load_level, save_level=save_level,
                            example_input=example, teacher_dir=root / P.TEACHER, log=ctx.log,
                            extra={"steps_per_epoch": len(retrain_loader)})
        if cfg.prune.target_sparsity > 0:
            ctx.log(f"[prune] {cfg.prune.strategy} to sparsity {cfg.prune.target_sparsity}")
            levels = STRATEGIES.get(cfg.prune.strategy)(pctx)
        else:
            levels = []
        rows = [{"level": 0, "sparsity": 0.0, "val_acc": teacher_result.get("val_acc"), "test_acc": teacher_result["test_acc"],
                 "params_nonzero": sum(int((p != 0).sum()) for p in teacher.parameters()), "epochs": 0, "steps": 0, "wall_s": 0.0}]
        for lv in levels:
            rows.append({"level": lv.index, "sparsity": lv.sparsity, **{k: lv.metrics.get(k) for k in ("val_acc", "test_acc", "epochs", "steps", "wall_s")}})
        final = levels[-1] if levels else None
        if final is not None:
            # The model holds the last level already; make sure of it (strategies may have moved on).
            ckpt.load_into(model, level_dir(final.index) / P.MODEL, "pruned teacher")
            masks = final.masks
        rows[-1]["params_nonzero"] = sum(int((p != 0).sum()) for p in model.parameters())
        return {"strategy": cfg.prune.strategy, "target_sparsity": cfg.prune.target_sparsity, "final_level": final.index if final else 0,
                "sparsity": sparsity(masks) if final else 0.0, "levels": rows,
                "epochs": sum(r["epochs"] or 0 for r in rows), "steps": sum(r["steps"] or 0 for r in rows),
                "wall_s": round(sum(r["wall_s"] or 0 for r in rows), 3)}

    # Made from the teacher; it hands on its final level, which is recorded too, so a level redone
    # differently makes the whole stage stale, not only the levels after it.
    result, fresh = run_stage(ctx, d, compute, cleanup=False, inputs=lambda r: [*sources(teacher), *level_files(r["final_level"])])
    final = result["final_level"]
    # Later stages are made from the final level's weights and masks (the teacher's, unpruned).
    model.ptd_sources = (level_dir(final) / P.MODEL, level_dir(final) / P.MASKS) if final else sources(teacher)
    if not fresh:
        if final == 0:
            return model, masks, result
        return model, load_level(final).masks, result
    rows = result["levels"]
    ctx.log(f"[prune] sparsity {result['sparsity']:.4f}, test acc {rows[-1]['test_acc']:.4f} (dense {rows[0]['test_acc']:.4f})")
    return model, masks, result


def stage_student(ctx: Context, teacher: nn.Module, pruned: nn.Module, masks: Masks) -> dict:
    cfg, d = ctx.cfg, ctx.run_dir / P.STUDENT

    def compute() -> dict:
        # The student built here (its random init, kept as student_init with inherit, and its
        # measured figures) came from whatever the RNG held on entry: a session that computed the
        # earlier stages and one that reused them built different students (crash audit: a resumed
        # run's nonzero count 367,593 against 367,594).
        seed_everything(stream_seed(cfg.seed, "student_arch"))
        plan = None
        if cfg.student.source == "derive":
            from ptd.students import derive_configured

            sc = cfg.student
            student, plan = derive_configured(pruned, masks, inherit=sc.inherit, round_to=sc.round_to,
                                              round_narrower=sc.round_narrower, device_type=ctx.rt.device.type)
            if plan.round_to_choice:
                ctx.log(f"[student] round_to {plan.round_to_choice}")
            ctx.sized(student)
        else:
            student = ctx.new_model(cfg.student.model)
        spec = student.ptd_spec
        from ptd.students.report import compare, format_report

        ctx.log("[student] measuring parameters, FLOPs and CPU latency (batch 1 and 64, interleaved)")
        # Latency on the CPU, models timed in turn so machine noise hits all three alike. The pruned
        # teacher runs the same dense kernels as the teacher.
        # Same memory format and device for all three, or the comparison measures layouts, not models.
        student = ctx.rt.prepare(student)
        rep = compare(teacher, pruned, masks, student, plan, ctx.input_shape, measure_latency=ctx.main)
        lat = rep.get("latency", {})
        stats = {"spec": spec, **{k: {**v, "latency": {b: lat[b][k] for b in lat}} for k, v in rep["models"].items()},
                 "ratios": rep["ratios"], "plan": plan.to_dict() if plan is not None else None}
        text = format_report(rep)
        if ctx.main:
            from ptd.export import format_latency, onnx_latency

            # The deployed speed: both models exported to ONNX (on copies) and timed in onnxruntime,
            # on as many threads as the PyTorch figures above, so the two runtimes compare like for
            # like (at 1 thread against PyTorch's 2, CIFAR VGG19 at batch 64 read 470 ms in
            # onnxruntime against 293 ms in PyTorch: a thread count, not a runtime, difference).
            try:
                stats["onnx_latency"] = onnx_latency(teacher, student, ctx.input_shape, repeats=5, threads=torch.get_num_threads())
                text += "\n" + "\n".join(format_latency(stats["onnx_latency"])) + "\n"
            except Exception as e:  # noqa: BLE001 -- a deployment timing must not end a run whose teachers are trained
                why = one_line(f"{type(e).__name__}: {e}")[:200]
                stats["onnx_latency"] = {"runtime": "onnxruntime CPU", "error": why}
                text += f"\nlatency in onnxruntime: not measured ({why})\n"
                ctx.log(f"[student] onnxruntime latency not measured: {why}")
            if ctx.rt.device.type == "cuda":  # where the run trains, the user will want to know too
                from ptd.measure import device_latency

                stats["cuda_latency"] = device_latency(teacher, student, ctx.input_shape, ctx.rt.device)
            ckpt.write_text(d / P.ARCHITECTURE, spec_to_text(spec))
            ckpt.write_text(d / P.ARCHITECTURE_TXT, f"# rebuild: ptd.models.build_from_spec(json.load(open('{P.ARCHITECTURE}')))\n{student}\n")
            ckpt.write_text(d / P.STUDENT_REPORT, text)
            if cfg.student.inherit:
                ckpt.save_model(d / P.STUDENT_INIT, student)
        return stats

    stats, fresh = run_stage(ctx, d, compute, result_file=P.STATS, cleanup=False, inputs=sources(teacher) + sources(pruned))
    if fresh:
        ctx.log(f"[student] {stats['spec']['arch']}: {stats['student']['params']:,} params vs teacher {stats['teacher']['params']:,}")
    return stats


def stage_distill(ctx: Context, arm: str, seed: int, student_stats: dict, teacher: nn.Module | None, d: Path | None = None,
                  loss: str | None = None, replicate: int = 0) -> dict:
    """Train the student for one arm and seed: alone (``teacher`` None) or distilled from
    ``teacher`` with ``loss`` (default: the run's first distill.loss), under teacher replicate
    ``replicate``."""
    cfg = ctx.cfg
    loss = None if teacher is None else (loss or cfg.distill.losses[0])
    d = d or P.distill_dir(P.replicate_root(ctx.run_dir, replicate), arm, seed, cfg.distill.folder_loss(loss))
    data_seed = student_seed(cfg, seed, replicate)

    def compute() -> dict:
        # The same (seed, replicate) gives every arm and loss the same student init and data order.
        seed_everything(stream_seed(cfg.seed, "student_init", seed, epoch=replicate))
        student = build_from_spec(student_stats["spec"])  # ctx.fit marks its input size before any save
        if cfg.student.inherit:
            ckpt.load_into(student, ctx.run_dir / P.STUDENT / P.STUDENT_INIT, "student")
        student = ctx.rt.prepare(student)
        unit = make_distiller(ctx, student, teacher, cfg.distill.optim, data_seed, "ce" if loss is None else loss)
        ctx.log(f"[distill] {name} seed {seed}: {_epochs(cfg.distill.optim.epochs)}")
        try:
            r = ctx.fit(student, cfg.distill.optim, d, data_seed, f"{name} s{seed}", unit=unit)
        finally:
            unit.remove_hooks()  # the teacher is shared by later arms
        return {"arm": arm, "seed": seed, "loss": loss, "test_acc": r["test_acc"], "val_acc": r["val_acc"], "best_epoch": r["best_epoch"],
                "params": student_stats["student"]["params"], "flops": student_stats["student"]["flops"],
                "epochs": r["epochs"], "steps": r["steps"], "wall_s": r["wall_s"]}

    name = cfg.distill.student_name(arm, loss)
    # What a student is made from: its architecture (and inherited weights), not stats.json, which
    # also holds measured latencies: a student stage redone after its done was lost came out with
    # other timings, and every finished distillation was then refused for good (bad-input audit).
    student_files = [ctx.run_dir / P.STUDENT / P.ARCHITECTURE] + ([ctx.run_dir / P.STUDENT / P.STUDENT_INIT] if cfg.student.inherit else [])
    result, fresh = run_stage(ctx, d, compute, inputs=[*sources(teacher), *student_files], student=True)
    if fresh:
        ctx.log(f"[distill] {name} seed {seed}: test acc {result['test_acc']:.4f}")
    # Set here, not only in compute: rows of runs finished before these keys existed get them too.
    result = {**result, "loss": loss}
    if cfg.teacher.seeds > 1:
        result["teacher"] = replicate
    return result


def make_distiller(ctx: Context, student: nn.Module, teacher: nn.Module | None, optim: OptimConfig, seed: int,
                   name: str | None = None) -> nn.Module:
    """The training unit for one distillation: loss ``name`` (default: the run's first) from
    ``teacher``, or plain cross-entropy (the ``ce`` loss) when there is no teacher (the scratch arm).
    ``seed``: the data-order seed of the student's loader (its first batch sizes the probe)."""
    from ptd.distill import build_distiller

    dc = ctx.cfg.distill
    name = "ce" if teacher is None else (name or dc.losses[0])
    loader = ctx.train_loader(optim.batch_size, seed)
    return build_distiller(
        student, teacher, name, options={k: v for k, v in dc.options.items() if k == name},
        defaults={"alpha": dc.alpha, "temperature": dc.temperature}, num_classes=ctx.splits.num_classes,
        num_samples=len(ctx.splits.train), labels=getattr(ctx.splits.train, "y", None),  # folder splits may not hold labels in memory
        epochs=optim.epochs, example_input=lambda: next(iter(loader))[0][:2], layer_map=dc.layer_map,
        batch_size=optim.batch_size,
    ).to(ctx.rt.device)


def _check_control_optim(ctx: Context, d: Path, each_round: OptimConfig) -> None:
    """control/optim.json records the optimizer the control's rounds train with, before its first
    round. ptd before 2026-11-29 trained every control with prune.retrain's: an unfinished control it
    left, resumed now, would mix the two (its finished rounds at the old rate, a half-trained one
    restoring the old optimizer state: three different models, review). Where the strategy's
    optimizer is prune.retrain's, an unrecorded control is the same training and is adopted."""
    want = {k: v for k, v in dataclasses.asdict(each_round).items() if k != "epochs"}
    want = json.loads(json.dumps(want))  # as it reads back (tuples as lists)
    rec = d / P.CONTROL_OPTIM
    started = any(d.glob("round_*"))
    if rec.is_file():
        have = read_json(rec)
        if have != want:
            raise RunDirError(f"{d}: its rounds were trained with another optimizer ({have}) than this config's control "
                              f"takes ({want}); delete {d} and the retrained_teacher students (distill/retrained_teacher_*) "
                              f"to retrain it, or pass --out a new directory")
        return
    if started and each_round != ctx.cfg.prune.retrain:
        old = dataclasses.asdict(ctx.cfg.prune.retrain)
        diff = ", ".join(f"{k} {old[k]} there, {v} here" for k, v in dataclasses.asdict(each_round).items() if k != "epochs" and old[k] != v)
        raise RunDirError(f"{d}: an unfinished control teacher started by an older ptd, which retrained it with "
                          f"prune.retrain's optimizer, where {ctx.cfg.prune.strategy}'s rounds train with another ({diff}); "
                          f"delete {d} to retrain it, or pass --out a new directory")
    if ctx.main:
        ckpt.write_json(rec, want)


def stage_control(ctx: Context, teacher: nn.Module, prune_result: dict, replicate: int = 0) -> tuple[nn.Module, dict]:
    """The control teacher: the unpruned teacher retrained round by round exactly as the pruned one
    was (same number of rounds, the strategy's retraining optimizer restarted each round:
    ``ptd.pruning.retrain_optim``), but never pruned. Weight rewinding has no dense counterpart (a
    dense teacher rewound each round would only repeat one round): its control keeps its weights."""
    cfg, d = ctx.cfg, P.replicate_root(ctx.run_dir, replicate) / P.CONTROL
    model = clone_model(ctx, teacher)
    # Made from the teacher, for as many rounds and epochs as the pruning's result says.
    inputs = [*sources(teacher), P.replicate_root(ctx.run_dir, replicate) / P.PRUNE / P.RESULT]

    def compute() -> dict:
        rounds = [lv for lv in prune_result["levels"] if lv["level"] > 0]
        each_round = retrain_optim(cfg.prune)
        _check_control_optim(ctx, d, each_round)
        total = {"epochs": 0, "steps": 0, "wall_s": 0.0}
        r: dict = {}
        for k, lv in enumerate(rounds, start=1):
            rd = P.round_dir(d, k)
            optim = replace(each_round, epochs=int(lv["epochs"] or each_round.epochs))

            def train_round(k: int = k, rd: Path = rd, optim: OptimConfig = optim) -> dict:
                ctx.log(f"[control] retraining the unpruned teacher, round {k}/{len(rounds)}")
                seed_everything(stream_seed(cfg.seed, f"control round {k}", replicate))  # as each pruning level (review)
                # The control ends its rounds as the pruning's do: it is the same training without the pruning.
                return ctx.fit(model, optim, rd, teacher_seed(cfg, replicate), f"control {k}", keep=cfg.prune.retrain_checkpoint)

            # round k continues from round k - 1's weights
            prev = [P.round_dir(d, k - 1) / P.MODEL] if k > 1 else []
            r, fresh = run_stage(ctx, rd, train_round, inputs=[*inputs, *prev])
            if not fresh:
                ckpt.load_into(model, rd / P.MODEL, "control teacher")
            for key in total:
                total[key] += r[key]
        if ctx.main:
            ckpt.save_model(d / P.MODEL, model)
        return {"rounds": len(rounds), "val_acc": r.get("val_acc"), "test_acc": r["test_acc"] if r else ctx.scores(model)["test_acc"], **total}

    result, fresh = run_stage(ctx, d, compute, cleanup=False,
                              inputs=lambda r: [*inputs, *([P.round_dir(d, r["rounds"]) / P.MODEL] if r["rounds"] else [])])
    model.ptd_sources = (d / P.MODEL,)
    if not fresh:
        ckpt.load_into(model, d / P.MODEL, "control teacher")
        return model, result
    ctx.log(f"[control] retrained unpruned teacher: test acc {result['test_acc']:.4f}")
    return model, result


def check_plugins(cfg: RunConfig, sweep: bool = False) -> None:
    """Every plugin name and plugin option in ``cfg``, checked against the registries before any
    work starts or the run directory is written (the config module itself imports no plugin).
    Raises a one-line ConfigError naming the key and the valid choices."""
    from ptd.distill import LOSSES, loss_options
    from ptd.models import MODELS
    from ptd.pruning import STRATEGIES

    def arch(where: str, m: ModelConfig | None) -> None:
        if m is not None and not m.arch.startswith("tv:") and m.arch not in MODELS:
            raise ConfigError(f"{where}.arch: unknown model {m.arch!r}{MODELS.meant(m.arch)}; valid: {', '.join(MODELS.names())}, "
                              f"or tv:<torchvision name>")

    def strategy(where: str, name: str) -> None:
        if name not in STRATEGIES:
            raise ConfigError(f"{where}: unknown pruning strategy {name!r}{STRATEGIES.meant(name)}; valid: {', '.join(STRATEGIES.names())}")

    from ptd.pruning import options_for, strategy_options

    arch("teacher.model", cfg.teacher.model)
    arch("student.model", cfg.student.model)
    strategy("prune.strategy", cfg.prune.strategy)
    for st in cfg.sweep.strategies:
        strategy("sweep.strategies", st)
    if sweep:  # each strategy with its own section of prune.options
        for st in cfg.sweep.strategies:
            strategy_options(st, options_for(cfg.prune.options, st))
    else:
        strategy_options(cfg.prune.strategy, dict(cfg.prune.options))
    dc = cfg.distill
    for name in dc.losses:
        if name not in LOSSES:
            raise ConfigError(f"distill.loss: unknown distillation loss {name!r}{LOSSES.meant(name)}; valid: {', '.join(LOSSES.names())}")
    for name in dc.options:
        if name not in dc.losses:
            raise ConfigError(f"distill.options.{name}: options for a loss that is not in distill.loss ({', '.join(dc.losses)}); "
                              f"remove them or add {name} to distill.loss")
    opts = {name: loss_options(name, dc.options.get(name), {"alpha": dc.alpha, "temperature": dc.temperature}) for name in dc.losses}
    if sweep and len(dc.losses) > 1:
        raise ConfigError(f"distill.loss: {list(dc.losses)} lists {len(dc.losses)} losses, and a sweep distills with one; "
                          f"give one name (e.g. loss: {dc.losses[0]}), or compare losses with ptd run")
    if sweep and cfg.teacher.seeds > 1:
        raise ConfigError(f"teacher.seeds: {cfg.teacher.seeds} teacher replicates are for ptd run, and a sweep trains one teacher; "
                          f"set teacher.seeds: 1")
    check_layers(cfg, opts)


def check_layers(cfg: RunConfig, opts: dict[str, Any]) -> None:
    """Every layer a loss reads exists in the teacher and the student (by the student's own name
    after distill.layer_map): checked on freshly built models, before any data is read. A derived
    student keeps the teacher's module names, so the teacher's names stand for it."""
    import difflib

    from ptd.distill import LOSSES
    from ptd.distill.base import PENULTIMATE

    wanted = {name: LOSSES.get(name).feature_layers(o) for name, o in opts.items()}
    from ptd.distill.distiller import check_layer_map

    check_layer_map(cfg.distill.layer_map, opts)  # a map no loss reads is a mistake, not a no-op
    if not any(t or s for t, s in wanted.values()):
        return

    def names_of(m: ModelConfig) -> list[str]:
        # num_classes and in_channels do not change module names; small values keep this cheap.
        model = build_model(m.arch, num_classes=10, in_channels=3, width=m.width, **m.kwargs)
        return [n for n, _ in model.named_modules() if n]

    def check(side: str, loss: str, layer: str, valid: list[str]) -> None:
        if layer == PENULTIMATE or layer in valid:
            return
        near = difflib.get_close_matches(layer, valid, n=4, cutoff=0.4)
        hint = f"nearest: {', '.join(near)}" if near else f"e.g. {', '.join(valid[:4])}"
        raise ConfigError(f"distill.options.{loss}: layer {layer!r} is not a module of the {side} ({hint}; or {PENULTIMATE}); "
                          f"name one of its modules" + (", or map it with distill.layer_map" if side == "student" else ""))

    t_names = names_of(cfg.teacher.model)
    s_names = names_of(cfg.student.model) if cfg.student.source == "named" else t_names
    for loss, (t_layers, s_layers) in wanted.items():
        for layer in t_layers:
            check("teacher", loss, layer, t_names)
        for layer in s_layers:
            check("student", loss, cfg.distill.layer_map.get(layer, layer), s_names)


def student_tasks(cfg: RunConfig, arms: Sequence[str]) -> list[tuple[str, int, str | None]]:
    """(arm, seed, loss) of every student of one teacher replicate, in the order they train: each
    teacher arm with each distill.loss, the scratch arm (no teacher, so no loss to vary) once."""
    return [(arm, seed, loss) for arm in arms
            for loss in (cfg.distill.losses if ARM_TABLE[arm].teacher is not None else (None,))
            for seed in cfg.distill.seeds]


def pending_students(ctx: Context, arms: Sequence[str], replicate: int = 0) -> list[tuple[str, int, str | None, int]]:
    """The (arm, seed, loss, replicate) of :func:`student_tasks` whose stage is not done."""
    cfg = ctx.cfg
    root = P.replicate_root(ctx.run_dir, replicate)
    return [(arm, seed, loss, replicate) for arm, seed, loss in student_tasks(cfg, arms)
            if not is_done(P.distill_dir(root, arm, seed, cfg.distill.folder_loss(loss)))]


def distill_all(ctx: Context, arms: Sequence[str], s_stats: dict, teachers: dict[str | None, nn.Module | None],
                replicate: int = 0) -> list[dict]:
    """Every student of one teacher replicate (:func:`student_tasks`)."""
    return [stage_distill(ctx, arm, seed, s_stats, teachers[ARM_TABLE[arm].teacher], loss=loss, replicate=replicate)
            for arm, seed, loss in student_tasks(ctx.cfg, arms)]


# ---------------------------------------------------------------- students side by side (jobs > 1)
# Why processes and not threads: the students (and their teachers' forwards) are small
# convolutions that oneDNN runs overhead-bound, so a second thread inside one step gains little;
# two steps side by side, one thread each, keep both cores busy. Measured on this project's 2-core
# AMD EPYC VM (benchmarks/parallel_fits.py, benchmarks/results/parallel_fits.md): KD steps of the
# demo's student 1.26-1.55x the throughput of one process on 2 threads (median 1.53x); the
# teacher's own training steps 1.15-1.19x, which is why only the students run side by side.
#
# What it does not change: every distillation is its own stage, seeded from its own streams,
# reading its teacher through the same stage functions (which, done, only read and check
# lineage), written atomically into its own folder. So a worker's student on 1 thread is
# bit-identical to the one a 1-job run on 1 thread trains, a kill anywhere resumes as before, and
# results and report come from the ordinary sequential pass, which finds every student done. The
# parent holds the run directory's lock; workers never take it, and die with the parent (ptd.jobs).

_WORKER: dict[str, Any] = {}  # per worker process: its context and the teachers it loaded


def worker_threads(cfg: RunConfig) -> int:
    """Torch threads per worker: the run's threads (torch's default when unset) shared out."""
    return max(1, (cfg.threads or torch.get_num_threads()) // cfg.jobs)


def _student_worker_init(cfg_dict: dict, run_dir: str, threads: int) -> None:
    from ptd.config import from_dict

    torch.set_num_threads(threads)
    cfg = replace(from_dict(RunConfig, cfg_dict).validate(), quiet=True)
    d = init_distributed("cpu")
    rt = Runtime(device=resolve_device("cpu", d), amp=cfg.amp, channels_last=cfg.channels_last, fast_wgrad=cfg.fast_wgrad,
                 compile=cfg.compile, quiet=True, dist=d)
    from ptd.data import load_configured

    _WORKER.clear()
    # headers only: the parent checked every image as the config says before any worker started
    _WORKER["ctx"] = Context(cfg, Path(run_dir), rt, load_configured(cfg.data, cfg.seed, check_images="headers"), lambda s: None,
                             in_worker=True)


def _worker_replicate(replicate: int) -> dict[str, Any]:
    key = ("rep", replicate)
    if key not in _WORKER:
        ctx = _WORKER["ctx"]
        teacher, t_res = stage_teacher(ctx, replicate=replicate)
        pruned, masks, p_res = stage_prune(ctx, teacher, t_res, replicate=replicate)
        _WORKER[key] = {"unpruned": teacher, "pruned": pruned, "masks": masks, "p_res": p_res}
    return _WORKER[key]


def _student_worker(task: tuple[str, int, str | None, int]) -> dict:
    """One student of ``pending_students``, in a worker: its teacher and the student's stats are
    loaded from the finished stages (once per worker), then its stage runs as in the run."""
    arm, seed, loss, replicate = task
    ctx, kind = _WORKER["ctx"], ARM_TABLE[arm].teacher
    rep = _worker_replicate(replicate)
    if "stats" not in _WORKER:  # one student architecture, derived from replicate 0's pruned teacher
        base = _worker_replicate(0)
        _WORKER["stats"] = stage_student(ctx, base["unpruned"], base["pruned"], base["masks"])
    if kind == "retrained" and "retrained" not in rep:
        rep["retrained"], _ = stage_control(ctx, rep["unpruned"], rep["p_res"], replicate=replicate)
    return stage_distill(ctx, arm, seed, _WORKER["stats"], rep[kind] if kind else None, loss=loss, replicate=replicate)


def distill_in_parallel(ctx: Context, tasks: list[tuple], worker: Callable[[tuple], dict] | None = None) -> None:
    """Train the students ``tasks`` (:func:`pending_students`) ``cfg.jobs`` at a time in worker
    processes, with progress and an ETA; the first failure stops the others (their stages resume
    on the next run) and is raised here as the worker raised it. ``worker`` (default: the run's,
    ``_student_worker``) trains one task in a worker whose context ``_student_worker_init`` made;
    ``ptd sweep`` passes its own. It must be a module-level function: workers are spawned."""
    cfg = ctx.cfg
    if not tasks:
        return
    from ptd.jobs import WorkerDied, run_in_workers

    threads = worker_threads(cfg)
    n = min(cfg.jobs, len(tasks))
    ctx.log(f"[distill] {len(tasks)} students, {n} at a time ({threads} thread{'s' if threads > 1 else ''} each)")
    t0 = time.perf_counter()
    with tqdm(total=len(tasks), desc=f"distill ({n} jobs)", unit="student", disable=cfg.quiet, leave=False) as bar:
        def done(row: dict) -> None:
            bar.update(1)
            ctx.log(f"[distill] {cfg.distill.student_name(row['arm'], row.get('loss'))} seed {row['seed']}: test acc {row['test_acc']:.4f}")

        try:
            run_in_workers(worker or _student_worker, tasks, n, initializer=_student_worker_init,
                           initargs=(to_dict(cfg), str(ctx.run_dir), threads), on_result=done)
        except WorkerDied as e:  # killed from outside: the CLI called it a bug in ptd
            if e.exitcode != -signal.SIGKILL:
                raise  # an exit code, a crash, a scheduler's SIGTERM: not the memory case; the traceback stays
            raise WorkerDiedError(f"jobs: a student's worker process (pid {e.pid}) died with {e.how} before it finished "
                                  f"(SIGKILL is typically the kernel's out-of-memory killer: each of the {n} workers holds "
                                  f"its own data, teacher and student); lower jobs or the batch sizes and run the same "
                                  f"command again, which resumes the students where they stopped") from None
    ctx.log(f"[distill] {len(tasks)} students in {time.perf_counter() - t0:.0f} s")


def run_pipeline(cfg: RunConfig, run_dir: str | Path, until: str = "report", arms: Sequence[str] | None = None,
                 log: Callable[[str], None] | None = None, reuse_from: str | Path | None = None) -> dict:
    """Run every stage up to and including ``until``; returns what the last stage produced.
    ``reuse_from``: a run directory whose finished teacher, pruning and control are copied in
    instead of trained (``--from``; :func:`check_reuse` says when it may be)."""
    if until not in STAGES:
        raise ValueError(f"unknown stage {until!r}; valid: {', '.join(STAGES)}")
    log = log or (lambda s: tqdm.write(s))
    t0 = time.perf_counter()
    from ptd.preflight import preflight

    src_lock = None
    if reuse_from is not None:
        from ptd.preflight import check_out_dir

        check_out_dir(run_dir)  # (a file as --out is named as such, before --from's checks)
        src_lock = _read_lock_source(Path(reuse_from))
    try:
        with on_every_rank():  # every rank runs these checks on the same inputs: rank 0 alone prints a refusal
            copies = check_reuse(cfg, reuse_from, run_dir) if reuse_from is not None else None
            splits = preflight(cfg, run_dir, until=until, arms=arms)  # every user error up front, before the run directory is written
            check_plugins(cfg)
            ctx = make_context(cfg, Path(run_dir), log, splits=splits, reuse=(Path(reuse_from), copies) if copies else None,
                               until=until, arms=arms)
    finally:
        ckpt.read_unlock_dir(src_lock)  # copied (or refused): a ptd may run in the earlier run again
    try:
        out = _run_stages(ctx, until, arms, log, t0)
        finish_growth(ctx)
        return out
    finally:
        ckpt.unlock_dir(run_dir)


def main_writes(ctx: Context, write: Callable[[], None], what: str) -> None:
    """``write()`` on rank 0 while every rank waits for it (one collective, which also carries
    rank 0's failure, so every rank stops together); ``write()`` alone on one process. Without it a
    rank returned before rank 0 had written the report, the CLI read report.md before it existed,
    and torchrun killed rank 0 mid-write (measured, 4 of 4 runs)."""
    failed: BaseException | None = None
    if ctx.main:
        try:
            write()
        except BaseException as e:  # noqa: BLE001 -- every rank stops together, rank 0 says why
            failed = e
    if all_sum([0.0 if failed is None else 1.0], ctx.rt.device)[0] > 0:
        raise failed if failed is not None else RunDirError(f"{what} failed on rank 0")


def plan_line(cfg: RunConfig, until: str, arms: Sequence[str], run_dir: Path | None = None) -> str:
    """What a command will train, in epochs (full passes over the training images), before it
    starts: each stage's bar has its own ETA, but nothing said how many stages follow it, so the
    first bar's ETA read as the run's (new-user audit). With ``run_dir``, how many of those epochs
    its finished stages already hold (a resume, a grown run, --from: reused, '[reused]' lines)."""
    from ptd.preflight import planned_epochs

    pc, reps = cfg.prune, cfg.teacher.seeds
    plan = planned_epochs(cfg, until, arms)  # the numbers the refusal past MAX_PLANNED_EPOCHS counts
    total = sum(n * e for n, e in plan.values())
    rep = f" x {reps} teacher replicates" if reps > 1 else ""
    roots = [P.replicate_root(run_dir, r) for r in range(reps)] if run_dir is not None else []

    def finished(stage: str) -> int:  # replicates whose stage folder is done
        return sum(is_done(root / stage) for root in roots)

    t_ep = cfg.teacher.optim.epochs if "teacher" in plan else 0
    parts = [f"teacher {_epochs(t_ep)}{rep}" if t_ep else "teacher loaded, not trained"]
    done = t_ep * finished(P.TEACHER)  # epochs whose stage is finished
    rounds = plan["pruning"][0] // reps if "pruning" in plan else 0
    if "pruning" in plan:
        parts.append(f"pruning {rounds} round(s) of {_epochs(pc.retrain.epochs)}{rep}")
        done += rounds * pc.retrain.epochs * finished(P.PRUNE)
    if "control" in plan:
        parts.append(f"control {rounds} round(s) of {_epochs(pc.retrain.epochs)}{rep}")
        done += rounds * pc.retrain.epochs * finished(P.CONTROL)
    if "students" in plan:
        tasks = student_tasks(cfg, arms)
        parts.append(f"{plan['students'][0]} student(s) of {_epochs(cfg.distill.optim.epochs)} ({len(arms)} arm(s), {len(cfg.distill.seeds)} seed(s)"
                     + (f", {len(cfg.distill.losses)} losses for each arm with a teacher" if len(cfg.distill.losses) > 1 else "")
                     + (f", {reps} teacher replicates)" if reps > 1 else ")"))
        done += cfg.distill.optim.epochs * sum(is_done(P.distill_dir(root, a, sd, cfg.distill.folder_loss(loss)))
                                               for root in roots for a, sd, loss in tasks)
    line = f"[plan] {'; '.join(parts)}: {_epochs(total)} of training in all"
    if done:
        line += f", {_epochs(done)} of them finished earlier (reused)"
    return line + (" (a student's epoch is cheaper: a smaller net)" if until in ("distill", "report") else "")


def _run_stages(ctx: Context, until: str, arms: Sequence[str] | None, log: Callable[[str], None], t0: float) -> dict:
    cfg = ctx.cfg
    arms = list(arms or cfg.distill.arms)
    log(plan_line(cfg, until, arms, ctx.run_dir))
    from ptd.data.base import depth_note, upscale_note

    for note in (upscale_note(ctx.splits, cfg.data.image_size), depth_note(ctx.splits)):
        if note is not None:
            log(note)
    students: list[dict] = []
    reps: list[dict] = []  # per teacher replicate: its teacher, pruning and control results
    s_stats: dict = {}
    for r in range(cfg.teacher.seeds):
        teacher, t_res = stage_teacher(ctx, replicate=r)
        reps.append({"replicate": r, "teacher": t_res})
        if until == "teacher":
            continue
        pruned, masks, p_res = stage_prune(ctx, teacher, t_res, replicate=r)
        reps[-1]["prune"] = p_res
        if until == "prune":
            continue
        if r == 0:
            # One student architecture for every replicate, derived from replicate 0's pruned
            # teacher: students of different teachers then differ only by what they were taught.
            s_stats = stage_student(ctx, teacher, pruned, masks)
            if until == "student":
                return s_stats
        # Each arm's teacher is the one of the kind ARM_TABLE names; the control teacher is trained
        # only when an arm asks for it, before any student.
        teachers: dict[str | None, nn.Module | None] = {None: None, "unpruned": teacher, "pruned": pruned}
        reps[-1]["control"] = None
        if any(ARM_TABLE[a].teacher == "retrained" for a in arms):
            teachers["retrained"], reps[-1]["control"] = stage_control(ctx, teacher, p_res, replicate=r)
        if cfg.jobs > 1:  # the students side by side in worker processes; the pass below then reads them
            distill_in_parallel(ctx, pending_students(ctx, arms, replicate=r))
        students += distill_all(ctx, arms, s_stats, teachers, replicate=r)
        del teacher, pruned, teachers  # one replicate's teachers in memory at a time
    if until in ("teacher", "prune"):
        # Replicate 0's result, as before; with teacher.seeds > 1 every replicate's beside it
        # (ptd train and ptd prune printed replicate 0's alone: review).
        return {**reps[0][until], "replicates": [rep[until] for rep in reps]} if len(reps) > 1 else reps[0][until]
    if until == "distill":
        return {"students": students}
    from ptd.data.base import test_set_facts
    from ptd.report import build_results, log_not_learned, not_learned, write_report

    r0 = reps[0]
    results = build_results(cfg, r0["teacher"], r0["prune"], s_stats, students, control=r0["control"],
                            replicates=reps if len(reps) > 1 else None,
                            test_set=test_set_facts(ctx.splits.test, ctx.splits.num_classes),
                            setup={"images": {k: len(getattr(ctx.splits, k)) for k in ("train", "val", "test")},
                                   "device": str(ctx.rt.device), "amp_bf16": bool(ctx.rt.uses_amp)})
    def report() -> None:
        write_report(ctx.run_dir, results)
        log_not_learned(not_learned(results), results["test_set"], log, str(ctx.run_dir / P.REPORT_MD))

    main_writes(ctx, report, f"writing the report into {ctx.run_dir}")
    log(f"done in {time.perf_counter() - t0:.0f} s: {ctx.run_dir}")
    return results
