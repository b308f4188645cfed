"""Everything checkable before work starts, checked before the run directory is written.

``preflight(cfg, run_dir)`` raises a one-line ``PtdError`` (``ConfigError`` for a config key,
``PreflightError`` for a path, ``DataError``/``CheckpointError`` for files) for: thread count,
device, output folder, pruning target vs. one round, ``prune.options.rewind_epoch``, the data
folder and files, the teacher (and a named student) building with their kwargs and running on this
data's images, a derived student being derivable from the teacher's architecture, and
``teacher.checkpoint`` being readable and of the teacher's architecture, and each training stage's
batch fitting in memory (activations, measured on the meta device, plus weights, gradients and
momentum).
Otherwise such mistakes surface hours later: after the teacher trained, or after ``config.yaml``
was written (which then refuses the corrected re-run).

Cost: one dataset load (skipped when the caller passes its ``splits``), one model build and one
forward pass of 2 images per model on the CPU, and one student derivation (well under a second for
ptd's families; seconds for most torchvision models, up to ~1 minute with the magnitude sort for
the largest, vit_h_14 and regnet_y_128gf: benchmarks/results/tv_zoo.md), and one meta-device
forward per model for its activations (0.03-0.15 s). A re-run of a finished run costs none of this
(``nothing_to_train``) but the data's load and check: no model is built (docs/resume.md).
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import socket
import stat
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ptd import paths as P
from ptd.config import ARM_TABLE, ConfigError, ModelConfig, RunConfig
from ptd.data.base import frame_size
from ptd.errors import PreflightError, PtdError, counted, least_shown, one_line
from ptd.machine import cpu_count, gib, gpu_memory_bytes, memory_bytes
from ptd.registry import UnknownNameError

# data.workers above this many per CPU is refused (see check_data_config).
WORKERS_PER_CPU = 4
# A model is refused before it is built when its fp32 weights, gradients and SGD momentum alone
# (3 x 4 bytes a parameter) would not fit in this machine's memory.
TRAINING_BYTES_PER_PARAM = 12


def preflight(cfg: RunConfig, run_dir: str | Path, *, splits: Any = None, sweep: bool = False, until: str = "report",
              arms: Sequence[str] | None = None) -> Any:
    """Check ``cfg`` for a run into ``run_dir``; returns the dataset splits it checked against.

    ``splits``: the caller's already-loaded ``Splits`` (the dataset is loaded here otherwise).
    ``sweep``: also check ``sweep.sparsities`` x ``sweep.strategies`` (``ptd sweep``).
    Cheap checks run first, so a typo is reported before the dataset is read.
    """
    slow = SlowSteps(quiet=cfg.quiet)
    try:
        out = _preflight(cfg, run_dir, slow, splits=splits, sweep=sweep, until=until, arms=arms)
    finally:
        slow.stop()  # a refusal's own line says the rest
    slow.done()
    return out


def _preflight(cfg: RunConfig, run_dir: str | Path, slow: "SlowSteps", *, splits: Any, sweep: bool, until: str,
               arms: Sequence[str] | None) -> Any:
    check_threads(cfg.threads)
    device = check_device(cfg.device)
    check_jobs(cfg, device)
    check_losses_under_ddp(cfg, distills=sweep or until in ("distill", "report"))
    check_out_dir(run_dir)
    check_run_tree(cfg, run_dir, sweep=sweep, until=until, arms=arms)
    check_data_config(cfg)
    check_pruning(cfg, sweep=sweep)
    if sweep:
        from ptd.config import check_sweep

        check_sweep(cfg)  # a sweep has no control arm: a listed one is refused, not silently dropped
    check_planned_epochs(cfg, until, arms, sweep)
    if splits is None and nothing_to_train(cfg, run_dir, sweep=sweep, until=until, arms=arms):
        # A re-run of a finished run (or stage command): no model is built, trained or loaded from
        # --teacher, so the checks below guard nothing; the data is still checked (recorded
        # sources unchanged, or the full load and fingerprint), and the config, the finished
        # stages and their inputs as the run directory opens. (4.0 s of the demo's 5.2 s re-run.)
        slow.step("loading and checking the data")
        return load_checked(cfg, device)
    if splits is None:
        splits = load_checked(cfg, device)
    check_crop_padding(cfg, splits)
    check_batches(cfg, splits)
    slow.step(f"building {cfg.teacher.model.arch} and running it on blank images")
    teacher = check_model(cfg.teacher.model, "teacher.model", splits, image_size=cfg.data.image_size)
    student = None
    if cfg.student.source == "named" and cfg.student.model is not None:
        slow.step(f"building {cfg.student.model.arch} and running it on blank images")
        student = check_model(cfg.student.model, "student.model", splits, image_size=cfg.data.image_size)
    check_device_memory(teacher, "teacher.model", device)
    if student is not None:
        check_device_memory(student, "student.model", device)
    slow.step("building the distillation losses")
    check_bridges(cfg, teacher, student, splits)
    check_own_losses(cfg, teacher, student, splits)
    slow.step("pruning a copy of the teacher to the target sparsity")
    check_no_certain_collapse(cfg, teacher, sweep=sweep)
    slow.step(f"deriving a student from a pruned copy of {cfg.teacher.model.arch}")
    derived = check_derivable(cfg, teacher, splits, sweep=sweep, device_type=device.type)
    slow.step("sizing each stage's activations")
    check_training_memory(cfg, teacher, student if student is not None else derived, splits, device)
    check_disk_space(cfg, run_dir, teacher, student if student is not None else derived, sweep=sweep, until=until, arms=arms)
    taken = (Path(run_dir) / P.TEACHER / P.DONE).is_file()  # the run holds its own copy of a loaded teacher
    if cfg.teacher.checkpoint and not (taken and not Path(cfg.teacher.checkpoint).exists()):
        # (Gone since the teacher stage took it, the file was checked then; its copy is what the run uses.)
        from ptd.train.checkpoint import check_fits_data, load_into, recorded

        load_into(teacher, cfg.teacher.checkpoint, "teacher")  # one-line CheckpointError: missing, unreadable, other arch
        rec = recorded(cfg.teacher.checkpoint)
        # A teacher trained at another size or class order would be scored, pruned and taught from on
        # images it never saw, or against relabelled data.
        check_fits_data(cfg.teacher.checkpoint, rec["input_size"], rec["classes"], frame_size(splits, cfg.data.image_size),
                        splits.classes, "this run", f"data.name={cfg.data.name}", role="teacher", other=True)
        # Once per run: a resume whose teacher stage is finished was checked when it started.
        if cfg.teacher.check_learned and not taken:
            slow.step(f"scoring {cfg.teacher.checkpoint} on validation images")
            check_teacher_learned(cfg, teacher, splits, device)
    return splits


# Images the loaded teacher is scored on before any work: enough for the binomial test to tell the
# audit's 32.5% from chance at 25% (p ~ 5e-5 at 500), spread evenly over the split (a folder split
# is sorted by class: its first images are all of class 0, where chance is 100%: review), and about
# 2 TFLOP for a ResNet-50 at 224 pixels rather than a pass over an ImageNet validation set.
TEACHER_CHECK_IMAGES = 500


def check_teacher_learned(cfg: RunConfig, teacher: nn.Module, splits: Any, device: torch.device | str = "cpu") -> None:
    """A loaded teacher (teacher.checkpoint, --teacher) scores above chance on this data: up to
    TEACHER_CHECK_IMAGES validation images spread evenly over the split (the test images where no
    validation set is carved),
    by the exact binomial test the report's "did not learn" check uses. A plain state dict records
    no class names, so a teacher that numbers the classes otherwise (Tiny-ImageNet in sorted order,
    where ptd follows wnids.txt) loaded, scored 32.5% against chance 25%, and was pruned and taught
    from for the whole run; the report's warning came after all of it (real-data audit)."""
    from ptd.data import make_loader
    from ptd.data.base import take, test_set_facts
    from ptd.report.stats import above_chance
    from ptd.train.checkpoint import CheckpointError
    from ptd.train.loop import Runtime, evaluate

    split, which = (splits.val, "validation") if len(splits.val) else (splits.test, "test")
    n = min(len(split), TEACHER_CHECK_IMAGES)
    sample = take(split, torch.linspace(0, len(split) - 1, n).round().long().unique())  # evenly spread: every class
    n = len(sample)
    if cfg.threads:  # the run's threads, as make_context sets them next (this is before it)
        torch.set_num_threads(cfg.threads)
    # On the run's device, where the teacher will train: a GPU run scored it on the CPU, about
    # 2 TFLOP for a ResNet-50 at 224 pixels and many times that for the zoo's largest teachers.
    dev = torch.device(device)
    loader = make_loader(sample, batch_size=max(1, min(cfg.eval_batch_size, n)), train=False, mean=splits.mean, std=splits.std,
                         device=dev, augment=False, image_size=cfg.data.image_size, workers=0)
    acc = evaluate(teacher.to(dev), loader, Runtime(device=dev, quiet=True, channels_last=False))["acc"]
    chance = test_set_facts(sample, splits.num_classes)["chance"]
    if above_chance(acc, n, chance)["learned"]:
        return
    order = ", ".join(f"{i} = {c}" for i, c in enumerate(splits.classes[:3])) + (", ..." if len(splits.classes) > 3 else "")
    raise CheckpointError(f"{cfg.teacher.checkpoint}: the teacher scores {100 * acc:.2f}% on {n} {which} images of "
                          f"data.name={cfg.data.name}, not above chance ({100 * chance:.2f}%): it was trained on other data, or "
                          f"numbers the classes otherwise (ptd numbers these {order}); give a teacher trained on this data in that "
                          f"order, or --set teacher.check_learned=false to use it anyway")


def load_checked(cfg: RunConfig, device: torch.device) -> Any:
    """The configured dataset, its images checked (``ptd.data.verify_images``). Under torchrun each
    machine's processes check a share of the images, so a bad file is one process's own error, and
    with bad files in several shares each process printed its own line, in any order, the first
    named not the first in the split. Every process now joins one collective once it has loaded
    (the process group starts here rather than in ``make_context``), and all of them raise the
    first refusal any of them met, a bad file by the split's order, which rank 0 alone says, as a
    single process would."""
    from ptd.data import DataError, load_configured
    from ptd.data.base import torchrun_shard

    own: PtdError | None = None
    try:
        # Each machine's processes check a share of its copy (a full decode of ImageNet is 30-90
        # CPU-minutes, world times over on one machine's cores otherwise); the gather below makes a
        # bad file in any share every process's refusal.
        splits = load_configured(cfg.data, cfg.seed, check_shard=torchrun_shard())
    except PtdError as e:
        own, splits = e, None
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        if own is not None:
            raise own
        return splits
    from ptd.train.distributed import gather_objects, init_distributed

    init_distributed(device.type)
    # Any refusal of one process (a file only its machine cannot read, as well as a bad image in its
    # share) is every process's: one that raised alone was silenced as "every rank's" while the
    # others waited in the rendezvous until torchrun stopped them, and no line was printed (review).
    # Errors from before the image check come first (-1), then bad images in split order.
    pos = getattr(own, "image_position", None)
    mine = None if own is None else (-1 if pos is None else pos, str(own))
    said = first_refusal(gather_objects((socket.gethostname(), mine)))
    if said is not None:
        raise DataError(said)  # the same on every rank (raised under on_every_rank: said once)
    return splits


# ---------------------------------------------------------------- a re-run with nothing to train
# A finished run re-run (the same command, the same --out) trains nothing, yet built and derived
# its models and sized their memory: 2.7 s of the demo's 5.2 s (1.5 s of it Python and torch's
# import; docs/resume.md). It now loads and checks the data only (1.3 s: a changed data folder is
# still refused) and builds no model.


def nothing_to_train(cfg: RunConfig, run_dir: str | Path, *, sweep: bool = False, until: str = "report",
                     arms: Sequence[str] | None = None) -> bool:
    """``run_dir`` holds a run whose every stage this command runs (``stage_dirs``) is finished, in one
    process (under torchrun each rank's own file system would decide, and ranks that disagreed
    would wait for each other in different collectives). A config that differs is refused as the
    run directory opens; one that grows the run has stages left."""
    run = Path(run_dir)
    if sweep or int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 or not (run / P.CONFIG).is_file():
        return False
    return all(_finished(run, run / rel) for rel in stage_dirs(cfg, sweep, until, arms))


def first_refusal(gathered: Sequence[tuple[str, tuple[int, str] | None]]) -> str | None:
    """The refusal every process says, from each process's (host name, its refusal or None): the
    first by position (-1, an error before the image check, then bad images in split order). With
    processes on several machines it names the machine: each may read its own copy of the data
    (node-local disks), where the path alone does not say which copy is bad."""
    found = [(r[0], r[1], host) for host, r in gathered if r is not None]
    if not found:
        return None
    pos, message, _ = min(found)
    hosts = sorted({h for h, _ in gathered})
    met = sorted({h for p, m, h in found if (p, m) == (pos, message)})
    if len(hosts) == 1 or met == hosts:  # one machine, or every machine met it (a config error): no host to name
        return message
    return f"on host {', '.join(met)}: {message}"


class SlowSteps:
    """Says what preflight is doing once it has run ``after`` seconds: the step then under way, each
    later step as it starts, and at the end how long the checks took. Preflight on a large
    torchvision teacher ran 15-24 s with nothing shown (convnext_small: derivation 18 s), where a
    user takes silence for a hang. Only on a terminal, as a progress bar is (a log, or a script
    reading ptd's one error line, gets no extra lines); rank 0 alone under torchrun; nothing with
    ``quiet``. ``slow.step("what")`` before each check names it."""

    def __init__(self, quiet: bool = False, after: float = 3.0, stream: Any = None, first: str = "reading the data"):
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        show = not quiet and os.environ.get("RANK", "0") in ("", "0") and bool(isatty and isatty())
        self.t0, self.current, self.said = time.perf_counter(), first, False
        self.timer = threading.Timer(after, self._first) if show else None
        if self.timer is not None:
            self.timer.daemon = True
            self.timer.start()

    def _say(self, what: str) -> None:
        print(f"ptd: checking the run before training ({time.perf_counter() - self.t0:.0f} s): {what}", file=self.stream, flush=True)

    def _first(self) -> None:
        self.said = True
        self._say(self.current)

    def step(self, what: str) -> None:
        """The check that starts now (said at once when the checks have already run ``after`` s)."""
        self.current = what
        if self.said:
            self._say(what)

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()

    def done(self) -> None:
        self.stop()
        if self.said:
            print(f"ptd: checks before training done in {time.perf_counter() - self.t0:.0f} s", file=self.stream, flush=True)


# ---------------------------------------------------------------- the checks, one per concern


def check_threads(threads: int | None) -> None:
    if threads is not None and threads < 1:
        raise ConfigError(f"threads: {threads!r} must be >= 1, or null for torch's default ({torch.get_num_threads()} here)")
    # More threads than CPUs only slows torch's kernels down, and an absurd count (1e9) makes
    # OpenMP abort the process while allocating its thread pool: no message, no exit code of ours.
    if threads is not None and threads > cpu_count():
        raise ConfigError(f"threads: {threads!r} is more than this machine's {cpu_count()} CPUs; set threads to at most "
                          f"{cpu_count()}, or null for torch's default ({torch.get_num_threads()} here)")


def check_losses_under_ddp(cfg: RunConfig, distills: bool = True) -> None:
    """Under torchrun (WORLD_SIZE > 1), a distillation loss that cannot train there (its
    ``single_process_only`` says why) is refused before any work, when this run distills."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1 or not distills:
        return
    from ptd.distill import LOSSES

    for name in cfg.distill.losses:
        try:
            why = LOSSES.get(name).single_process_only
        except UnknownNameError:
            continue  # check_plugins names it
        if why:
            raise ConfigError(f"distill.loss: {name} cannot train under torchrun (WORLD_SIZE={world}): {why}; run it in one "
                              f"process (without torchrun), or drop it from distill.loss")


def check_jobs(cfg: RunConfig, device: torch.device) -> None:
    """``jobs`` > 1 (students in parallel CPU processes, ptd.jobs) where it can run."""
    if cfg.jobs == 1:
        return
    if cfg.jobs > cpu_count():
        raise ConfigError(f"jobs: {cfg.jobs} is more than this machine's {cpu_count()} CPUs; set jobs to at most {cpu_count()}")
    if device.type != "cpu":
        raise ConfigError(f"jobs: {cfg.jobs} trains students in parallel CPU processes, but this run trains on {device}; "
                          f"set jobs: 1 (one GPU runs one student at a time best), or --device cpu")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"jobs: {cfg.jobs} cannot be combined with torchrun (WORLD_SIZE={os.environ['WORLD_SIZE']}); set jobs: 1")
    if cfg.threads is not None and cfg.threads < cfg.jobs:
        raise ConfigError(f"jobs: {cfg.jobs} workers need at least one thread each, but threads is {cfg.threads}; set threads "
                          f"to at least {cfg.jobs}, or null")


def check_device(device: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` that exists on this machine."""
    if device in ("auto", "cpu"):
        return torch.device("cuda" if device == "auto" and torch.cuda.is_available() else "cpu")
    idx = None
    if device != "cuda":
        head, _, n = device.partition(":")
        if head != "cuda" or not n.isdigit():
            raise ConfigError(f"device: {device!r} is not a device; use auto, cpu, cuda or cuda:N (e.g. --device cuda:0)")
        idx = int(n)
        if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
            # torchrun gives rank r cuda:LOCAL_RANK only for "cuda"/"auto": cuda:N put every rank on one GPU
            # (NCCL refuses that, after the data loaded), and the memory check assumes a GPU each.
            raise ConfigError(f"device: {device!r} under torchrun (WORLD_SIZE={os.environ['WORLD_SIZE']}) would put every "
                              f"process on that one GPU; use device: cuda, which gives each process its own "
                              f"(cuda:LOCAL_RANK), and pick the GPUs with CUDA_VISIBLE_DEVICES")
    if not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible (check CUDA_VISIBLE_DEVICES and the driver)"
        raise ConfigError(f"device: {device!r} asked for but CUDA is not available ({why}); use --device cpu or auto")
    if idx is not None and idx >= torch.cuda.device_count():
        raise ConfigError(f"device: {device!r} but this machine has {counted(torch.cuda.device_count(), 'GPU')} (cuda:0..cuda:{torch.cuda.device_count() - 1}); pick one of those")
    return torch.device(device)


# What a run needs of its directory (and of every folder in it that it writes into): to list it,
# lock it (open it read-only), create and rename files in it.
_DIR_ACCESS = os.R_OK | os.W_OK | os.X_OK


def _lstat(path: Path, where: Path) -> os.stat_result | None:
    """``path``'s own entry (a symbolic link is seen, not followed); None when nothing is there.
    Any other refusal of the file system (a name too long, no permission to look, a link loop
    on the way) is a one-line PreflightError naming ``path``: ``where`` is the run directory."""
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):  # a file on the way is named by the caller's walk up
        return None
    except OSError as e:
        raise _unprobeable(path, where, e) from None


def _unprobeable(path: Path, where: Path, e: OSError) -> PreflightError:
    if e.errno == errno.ENAMETOOLONG:
        inside = "" if path == where else f" (at {path})"
        return PreflightError(f"run directory {where}: a name in this path{inside} is longer than the file system allows "
                              f"({e.strerror}); pass --out a shorter path")
    what = f"run directory {where}" if path == where else f"run directory {where}: {path}"
    return PreflightError(f"{what} cannot be checked ({e.strerror or type(e).__name__}); give this user access to it, "
                          f"or pass --out another folder")


def _not_a_folder(path: Path, st: os.stat_result) -> str | None:
    """What ``path`` is when it is not a folder (following a symbolic link); None for a folder."""
    if stat.S_ISLNK(st.st_mode) and not os.path.exists(path):
        return f"a symbolic link to {os.readlink(path)}, which does not lead to an existing folder (dangling)"
    if os.path.isdir(path):
        return None
    return "a file"


def check_out_dir(run_dir: str | Path) -> None:
    """The run directory is a folder this user can read and write, or can be made one: its
    missing parents are created too (like ``mkdir -p``), so the nearest existing ancestor must be
    a folder this user can write. Symbolic links are seen (a dangling one is refused, not
    replaced), and any refusal of the file system while looking is one line naming the path."""
    p = Path(run_dir)
    st = _lstat(p, p)
    if st is not None:
        what = _not_a_folder(p, st)
        if what == "a file":
            raise PreflightError(f"run directory {p} is a file; pass --out a folder (new, empty, or an earlier run of this config)")
        if what is not None:
            raise PreflightError(f"run directory {p} is {what}; create the folder it points to, or remove the link, "
                                 f"or pass --out another path")
        if not os.access(p, _DIR_ACCESS):
            raise PreflightError(f"run directory {p} is not writable (ptd reads, writes and locks it); give this user "
                                 f"permission on it (chmod u+rwx {p}), or pass --out a folder you can write")
        return
    missing = [p.name]  # created by mkdir -p, innermost first
    anc = p.absolute().parent
    while (st := _lstat(anc, p)) is None and anc.parent != anc:
        missing.append(anc.name)
        anc = anc.parent
    if st is None:  # not even the file system's root: nothing to create the path in
        raise PreflightError(f"run directory {p} cannot be created: no folder of its path exists; pass --out a folder path")
    what = _not_a_folder(anc, st)
    if what is not None:
        raise PreflightError(f"run directory {p} cannot be created: {anc} is {what}; pass --out a folder path")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise PreflightError(f"run directory {p} cannot be created: {anc} is not writable; pass --out a folder you can write")
    _check_name_lengths(p, anc, missing)


def _check_name_lengths(p: Path, anc: Path, missing: list[str]) -> None:
    """The folders mkdir -p would make fit the file system's limits (a missing parent hides a
    too-long name from lstat: the lookup stops at the first missing name)."""
    def limit(name: str, default: int) -> int:
        try:
            return os.pathconf(anc, name)
        except (OSError, ValueError):
            return default

    longest = max(missing, key=lambda n: len(os.fsencode(n)))
    if len(os.fsencode(longest)) > limit("PC_NAME_MAX", 255):
        raise PreflightError(f"run directory {p}: the name {longest[:40]}... ({len(os.fsencode(longest))} bytes) is longer "
                             f"than the file system allows ({limit('PC_NAME_MAX', 255)}); pass --out a shorter path")
    if len(os.fsencode(str(p.absolute()))) >= limit("PC_PATH_MAX", 4096):
        raise PreflightError(f"run directory {p}: the path is longer than the file system allows "
                             f"({limit('PC_PATH_MAX', 4096)} bytes); pass --out a shorter path")


# Files ptd writes (each by a rename into place) at the top of a run directory, and inside a stage
# folder: a folder of that name makes the rename fail, after the stage's work.
RUN_FILES = (P.CONFIG, P.ENV, P.REUSED, P.RESULTS, P.REPORT_MD, P.REPORT_HTML, P.SWEEP_JSON, P.SWEEP_MD,
             "student_acc_vs_sparsity.png", "student_acc_vs_compute.png")
STAGE_FILES = (P.DONE, P.RESULT, P.MODEL, P.MASKS, P.SPARSITY, P.METRICS, P.STATS, P.ARCHITECTURE, P.ARCHITECTURE_TXT,
               P.STUDENT_REPORT, P.STUDENT_INIT, P.RESUME)
# Folders a stage makes inside its own (prune levels, control rounds): written while the stage runs.
_SUB_STAGE_PREFIXES = ("level_", "round_")


def stage_dirs(cfg: RunConfig, sweep: bool = False, until: str = "report", arms: Sequence[str] | None = None) -> list[Path]:
    """Every stage folder, relative to the run directory, that the run of ``cfg`` writes, as
    ptd.pipeline and ptd.sweep name them: the whole run (``ptd run``; ``ptd sweep`` with
    ``sweep``), or its stages up to ``until`` (``ptd train`` is "teacher") with the distillation
    ``arms`` given (default: the config's). A stage that trains also writes its TensorBoard
    mirror, tensorboard/<the same path>."""
    dc = cfg.distill
    if until not in P.STAGES:
        raise ValueError(f"unknown stage {until!r}; valid: {', '.join(P.STAGES)}")
    upto = P.STAGES.index(until)
    if sweep:
        from ptd.pruning import SPECS

        sps = sorted(set(cfg.sweep.sparsities))
        dirs = [Path(P.TEACHER), Path(P.STUDENT)]
        for st in cfg.sweep.strategies:
            nested = st in SPECS and SPECS.get(st).nested_levels
            dirs += [Path(P.PRUNE) / st] if nested else [Path(P.PRUNE) / f"{st}_s{s:g}" for s in sps]
        keys = [a for a in ("scratch", "unpruned_teacher") if a in dc.arms]
        keys += [f"{st}_s{s:g}" for st in cfg.sweep.strategies for s in sps]
        return dirs + [P.distill_dir(Path(), k, seed) for k in keys for seed in dc.seeds]
    arms = list(arms or dc.arms)
    dirs = [Path(P.STUDENT)] if upto >= P.STAGES.index("student") else []
    # `ptd student` returns after replicate 0's student: the other replicates are not started.
    for r in range(1 if until == "student" else cfg.teacher.seeds):
        root = P.replicate_root(Path(), r)
        dirs += [root / P.TEACHER] + ([root / P.PRUNE] if upto >= P.STAGES.index("prune") else [])
        if upto < P.STAGES.index("distill"):
            continue
        if any(ARM_TABLE[a].teacher == "retrained" for a in arms):
            dirs.append(root / P.CONTROL)
        for arm in arms:
            losses = dc.losses if ARM_TABLE[arm].teacher is not None else (None,)
            dirs += [P.distill_dir(root, arm, seed, dc.folder_loss(loss))
                     for loss in losses for seed in dc.seeds]
    return dirs


def check_run_tree(cfg: RunConfig, run_dir: str | Path, sweep: bool = False, until: str = "report",
                   arms: Sequence[str] | None = None) -> None:
    """An existing run directory (a resume, or a run grown by more seeds, arms...) takes every
    write the run will make: each folder a stage of ``cfg`` writes into that is not finished (and
    its TensorBoard mirror) is a folder, or can be made in one, that this user can write; the
    files ptd writes are not folders. Otherwise the run would fail at that stage's first write,
    after earlier stages trained and after config.yaml and env.json were rewritten."""
    run = Path(run_dir)
    st = _lstat(run, run)
    if st is None or not os.path.isdir(run):
        return  # a new run directory: check_out_dir decided
    for name in RUN_FILES:
        _not_a_file_folder(run, run / name)
    if not (run / P.CONFIG).is_file():
        return  # not a run (yet): open_run_dir takes it only when it is empty
    check_run_kind(run, sweep)
    from ptd.train.tensorboard import available

    mirror = available()  # TensorBoard event files are written only where tensorboard is installed
    tb = run / P.TENSORBOARD
    for rel in stage_dirs(cfg, sweep, until, arms):
        if _finished(run, run / rel):
            continue
        _check_writes_into(run, run / rel, lambda d: _finished(run, d))
        if mirror:  # a stage's mirror is written while the stage is
            _check_writes_into(run, tb / rel, lambda d: _finished(run, run / d.relative_to(tb)))


def run_kind(run: Path) -> str | None:
    """What made the run directory ``run``: "sweep" (``ptd sweep``), "run" (``ptd run`` and its stage
    commands), or None (only a teacher, a student or the shared arms: either may grow it).

    env.json records which command opened the directory in each session ("made_by"). Where one
    kind alone ever did and it wrote past the shared stages (anything under prune/), that decides.
    The layout decides otherwise: directories from before the record, or a teacher-only directory
    that both commands grew. By layout: "sweep" for sweep.json or a prune/<strategy> or
    prune/<strategy>_s<sparsity> folder; "run" for results.json, prune/level_<k>, prune/done,
    control/, teacher replicates, a pruned_teacher or retrained_teacher student. The layout alone
    took a run whose user left a prune/imp folder for a sweep, and missed a sweep of a strategy no
    longer registered (review)."""
    prune = run / P.PRUNE
    children = [c.name for c in prune.iterdir() if c.is_dir()] if prune.is_dir() else []
    layout = _layout_kind(run, children)
    made = _made_by(run)
    if len(made) == 1 and (layout is not None or children or (prune / P.DONE).exists()):
        return next(iter(made))
    return layout


def _made_by(run: Path) -> set[str]:
    """The commands env.json says opened ``run`` ("run", "sweep"); empty for older ptd or a damaged
    env.json (whose own reader reports it)."""
    try:
        env = json.loads((run / P.ENV).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return set()
    if not isinstance(env, dict):
        return set()
    resumed = env.get("resumed")
    sessions = [env] + (resumed if isinstance(resumed, list) else [])
    kinds = [e.get("made_by") if isinstance(e, dict) else None for e in sessions]
    if any(k not in ("run", "sweep") for k in kinds):
        return set()  # a session of older ptd: what it wrote is unrecorded
    return set(kinds)


def _layout_kind(run: Path, children: list[str]) -> str | None:
    from ptd.pruning import SPECS

    prune, distill = run / P.PRUNE, run / P.DISTILL
    # Only the names ptd.sweep gives: a folder a user left under prune/ (a backup) names neither.
    strategies = set(SPECS.names())
    swept = [c for c in children if c in strategies or ((m := re.fullmatch(r"(.+)_s[0-9.e+-]+", c)) and m[1] in strategies)]
    if (run / P.SWEEP_JSON).exists() or swept:
        return "sweep"
    arms = [c.name for c in distill.iterdir()] if distill.is_dir() else []
    levels = [c for c in children if re.fullmatch(r"level_\d+", c)]
    if ((run / P.RESULTS).exists() or levels or (prune / P.DONE).exists() or (run / P.CONTROL).exists()
            or (run / P.REPLICATES).exists() or any(a.startswith(("pruned_teacher", "retrained_teacher")) for a in arms)):
        return "run"
    return None


def check_run_kind(run: Path, sweep: bool) -> None:
    """A sweep and a run share teacher/, student/ and the report's names but not the rest: a sweep
    into a finished run trained every pruning level before it found the run's student and refused
    (hours, with the run's env.json rewritten and prune/ added to), and a run into a sweep replaced
    the sweep's report.html, after which ``ptd report`` rendered the run (bad-input audit)."""
    try:
        kind = run_kind(run)
    except OSError as e:
        raise _unprobeable(run, run, e) from None
    want = "sweep" if sweep else "run"
    if kind is not None and kind != want:
        made = "ptd sweep" if kind == "sweep" else "ptd run (or ptd train/prune/student/distill)"
        raise PreflightError(f"run directory {run} holds a {kind}, made by {made}; a {want} cannot go into it: pass --out a "
                             f"new directory")


def _finished(run: Path, d: Path) -> bool:
    """The stage in ``d`` is done: a re-run reads it and writes nothing into it."""
    try:
        return (d / P.DONE).is_file()
    except OSError as e:  # a folder on the way this user cannot enter
        raise _unprobeable(d, run, e) from None


def _not_a_file_folder(run: Path, path: Path) -> None:
    try:
        is_dir = path.is_dir()
    except OSError as e:
        raise _unprobeable(path, run, e) from None
    if is_dir:
        raise PreflightError(f"run directory {run}: {path} is a folder where ptd writes a file; move it away, or pass "
                             f"--out a new directory")


def _check_writes_into(run: Path, d: Path, finished: Any) -> None:
    """``d`` (inside ``run``) is a folder whose unfinished parts this user can write, or the
    nearest existing folder on its way is one this user can create it in."""
    cur = run
    for part in d.relative_to(run).parts:
        nxt = cur / part
        st = _lstat(nxt, run)
        if st is None:  # made by the stage: where it is made must take it
            _require_writable(run, cur, f"the stage folder {d.relative_to(run)}")
            return
        what = _not_a_folder(nxt, st)
        if what is not None:
            raise PreflightError(f"run directory {run}: {nxt} is {what}, where ptd keeps a stage's folder; move it away "
                                 f"(or delete it to redo that stage), or pass --out a new directory")
        cur = nxt
    todo = [d]
    while todo:
        folder = todo.pop()
        _require_writable(run, folder, "a stage's files")
        try:
            entries = list(os.scandir(folder))
        except OSError as e:
            raise _unprobeable(folder, run, e) from None
        for entry in entries:
            path = Path(entry.path)
            try:
                is_dir = entry.is_dir()
            except OSError as e:
                raise _unprobeable(path, run, e) from None
            if is_dir and entry.name in STAGE_FILES:
                _not_a_file_folder(run, path)
            elif is_dir and entry.name.startswith(_SUB_STAGE_PREFIXES) and not finished(path):
                todo.append(path)


def _require_writable(run: Path, folder: Path, what: str) -> None:
    if not os.access(folder, _DIR_ACCESS):
        raise PreflightError(f"run directory {run}: {folder} is not writable, and ptd writes {what} there; give this user "
                             f"permission on it (chmod u+rwx {folder}), or pass --out a new directory")


def check_data_config(cfg: RunConfig) -> None:
    d = cfg.data
    if d.workers < 0:
        raise ConfigError(f"data.workers: {d.workers!r} must be >= 0 (0: load in the main process)")
    # Loader workers decode JPEGs and may wait on disk, so a few per CPU can pay; thousands of
    # processes only exhaust the machine mid-run (fork fails after the teacher is built).
    if d.workers > WORKERS_PER_CPU * cpu_count():
        raise ConfigError(f"data.workers: {d.workers!r} loader processes for {cpu_count()} CPUs; use at most "
                          f"{WORKERS_PER_CPU * cpu_count()} ({WORKERS_PER_CPU} per CPU), typically one per CPU")
    if d.image_size is not None and d.image_size < 1:
        raise ConfigError(f"data.image_size: {d.image_size!r} must be >= 1 pixel, or null for the dataset's size")


def check_crop_padding(cfg: RunConfig, splits: Any) -> None:
    """Random-crop padding of at most the image's side: more pads each image with a border wider
    than itself (crops of almost nothing but zeros) and, absurdly large, exhausts memory mid-run."""
    side = min(frame_size(splits, cfg.data.image_size))
    if cfg.data.augment and cfg.data.crop_padding > side:
        raise ConfigError(f"data.crop_padding: {cfg.data.crop_padding} pixels is more than the {side}-pixel side of the "
                          f"images of {splits.name}; use at most {side} (the usual is an eighth of the side: 4 for 32 pixels)")


def check_batches(cfg: RunConfig, splits: Any) -> None:
    """Every training batch fits in the training split (per DDP rank): training drops the last
    partial batch, so a larger batch trains on nothing, found only when that stage starts."""
    world = max(1, int(os.environ.get("WORLD_SIZE", "1")))
    n = len(splits.train)
    per_rank = n // world
    sections = [("prune.retrain", cfg.prune.retrain), ("distill.optim", cfg.distill.optim)]
    if not cfg.teacher.checkpoint:
        sections.insert(0, ("teacher.optim", cfg.teacher.optim))
    for key, o in sections:
        if o.batch_size > per_rank:
            ranks = f" ({per_rank} for each of {world} processes)" if world > 1 else ""
            raise ConfigError(f"{key}.batch_size: {o.batch_size} is more than the {n} training images of {splits.name}{ranks}, "
                              f"so an epoch would train on nothing; use at most {per_rank}, or more data (data.train_subset, "
                              f"data.val_fraction)")


def check_rounds(target: float, rate: float, strategy: str, key: str, retrain_epochs: int = 1) -> None:
    """A strategy that prunes in rounds (it says so when it registers) asked for a target that
    rounds to zero rounds, or to so many that their retraining never ends: prune.rate=1e-9 (a
    typo for 0.2, say) planned 446,287,115 rounds and trained round after round, each pruning
    nothing (bad-input audit). The cap is MAX_EPOCHS of retraining, the bound on one schedule."""
    from ptd.config import MAX_EPOCHS
    from ptd.pruning import SPECS
    from ptd.pruning.select import rounds_for_target

    if not (strategy in SPECS and SPECS.get(strategy).rounds and target > 0):
        return
    rounds = rounds_for_target(target, rate)
    if rounds == 0:
        raise ConfigError(
            f"{key}: {target:g} is less than one pruning round: {strategy} removes prune.rate={rate:g} of the weights per "
            f"round, so the smallest reachable sparsity is {rate:g} (targets above {rate / 2:g} round to it); "
            f"set the target above {rate / 2:g}, or 0 for no pruning, or prune.rate below {2 * target:g}")
    if rounds * retrain_epochs > MAX_EPOCHS:
        most = max(1, MAX_EPOCHS // retrain_epochs)  # rounds the retraining allows
        least = least_shown(1 - (1 - target) ** (1 / most), lambda r: rounds_for_target(target, r) * retrain_epochs <= MAX_EPOCHS)
        raise ConfigError(
            f"prune.rate: {rate:g} of the weights per round takes {counted(rounds, 'round')} of {counted(retrain_epochs, 'retraining epoch')} "
            f"to reach {key.split(' ')[0]}={target:g}, {rounds * retrain_epochs:,} epochs in all (more than {MAX_EPOCHS:,}); "
            f"use a rate of at least {least} (the paper's is 0.2)")


# The most epochs (passes over the training images) one command may plan in all: its teacher, every
# pruning round, the control, every student, for each teacher replicate. 10x the bound on one
# schedule (config.MAX_EPOCHS): each key had its own bound, but their product had none, and a list
# typed too long (distill.seeds [0, ..., 4999], 3 arms of 200 epochs: 3,000,000 epochs, 35 days at
# one second an epoch) was accepted and started.
MAX_PLANNED_EPOCHS = 1_000_000


def planned_epochs(cfg: RunConfig, until: str = "report", arms: Sequence[str] | None = None,
                   sweep: bool = False) -> dict[str, tuple[int, int]]:
    """What a command trains, by kind of stage: {kind: (how many runs, epochs each)}, every teacher
    replicate counted; kinds it does not train are left out. A sweep's students are counted once per
    (strategy, sparsity), the most it trains (two sparsities on one IMP level share theirs)."""
    from ptd.pruning import SPECS
    from ptd.pruning.select import rounds_for_target

    pc, reps = cfg.prune, cfg.teacher.seeds

    def rounds(strategy: str, target: float) -> int:  # an unknown name is check_plugins' to refuse
        spec = SPECS.get(strategy) if strategy in SPECS else None
        return (rounds_for_target(target, pc.rate) if spec is None or spec.rounds else 1) if target else 0

    plan: dict[str, tuple[int, int]] = {}
    if not cfg.teacher.checkpoint:
        plan["teacher"] = (reps, cfg.teacher.optim.epochs)
    if sweep:
        n = 0
        for st in cfg.sweep.strategies:
            nested = st in SPECS and SPECS.get(st).nested_levels  # one run to the highest gives every level
            n += rounds(st, max(cfg.sweep.sparsities)) if nested else sum(rounds(st, s) for s in cfg.sweep.sparsities)
        plan["pruning"] = (n, pc.retrain.epochs)
        keys = sum(a in cfg.distill.arms for a in ("scratch", "unpruned_teacher"))
        keys += len(cfg.sweep.strategies) * len(cfg.sweep.sparsities)
        plan["students"] = (keys * len(cfg.distill.seeds), cfg.distill.optim.epochs)
        return plan
    arms = list(arms or cfg.distill.arms)
    if until != "teacher":
        plan["pruning"] = (rounds(pc.strategy, pc.target_sparsity) * reps, pc.retrain.epochs)
    if until in ("distill", "report"):
        if any(ARM_TABLE[a].teacher == "retrained" for a in arms):
            plan["control"] = plan["pruning"]  # the dense teacher retrained as many rounds
        per_seed = sum(len(cfg.distill.losses) if ARM_TABLE[a].teacher is not None else 1 for a in arms)
        plan["students"] = (per_seed * len(cfg.distill.seeds) * reps, cfg.distill.optim.epochs)
    return plan


def check_planned_epochs(cfg: RunConfig, until: str = "report", arms: Sequence[str] | None = None, sweep: bool = False) -> None:
    """Refuses a plan past MAX_PLANNED_EPOCHS, naming its largest part and the keys that make it."""
    plan = planned_epochs(cfg, until, arms, sweep)
    total = sum(n * e for n, e in plan.values())
    if total <= MAX_PLANNED_EPOCHS:
        return
    kind, (n, e) = max(plan.items(), key=lambda kv: kv[1][0] * kv[1][1])
    keys = {"teacher": "teacher.optim.epochs or teacher.seeds",
            "pruning": "prune.retrain.epochs, prune.rate or " + ("sweep.sparsities" if sweep else "teacher.seeds"),
            "control": "prune.retrain.epochs or prune.rate, or drop retrained_teacher from distill.arms",
            "students": "distill.seeds (" + f"{len(cfg.distill.seeds):,} listed" + "), distill.optim.epochs, distill.arms"
                        + (", sweep.sparsities or sweep.strategies" if sweep else ", distill.loss or teacher.seeds")}[kind]
    raise ConfigError(f"the plan trains {total:,} epochs in all, more than {MAX_PLANNED_EPOCHS:,} (10x the most one schedule "
                      f"may have); most of them are {kind}: {counted(n, 'run')} of {counted(e, 'epoch')}; lower {keys}")


# ---------------------------------------------------------------- disk space
# Besides the weights: each stage's metrics, records and TensorBoard events (the demo's 23 stage
# folders: 0.5 MB in all), and the report (0.4 MB).
SMALL_FILES_PER_STAGE = 64 * 2**10
# The margin on the estimate: 10%, and 64 MiB for what else writes to that disk meanwhile.
DISK_MARGIN = (1.10, 64 * 2**20)


def _tensor_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s state dict as a safetensors file holds it (weights and buffers)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def planned_bytes(cfg: RunConfig, run_dir: str | Path, teacher: nn.Module, student: nn.Module | None, *,
                  sweep: bool = False, until: str = "report", arms: Sequence[str] | None = None) -> tuple[int, int]:
    """(bytes the command will leave in ``run_dir``, bytes more it holds at its peak), estimated from
    ``planned_epochs``' counts less what the directory already holds finished: each teacher, pruning
    level (weights and a byte-per-weight mask), control round (and the control's final copy) and
    student keeps its weights, plus SMALL_FILES_PER_STAGE; a stage in training also holds its
    commit (resume.pt: the weights, the momentum, the masks), ``jobs`` students at once.
    Measured against ``du -sb`` of whole runs in docs/resume.md."""
    from ptd.pruning import SPECS
    from ptd.pruning.masks import prunable_weights

    run = Path(run_dir)
    w_t = _tensor_bytes(teacher)
    # Masks: one byte per weight of every Conv/Linear layer (those excluded from pruning too, all ones).
    m_t = sum(w.numel() for w in prunable_weights(teacher).values())
    w_s = _tensor_bytes(student) if student is not None else w_t  # (a student never outgrows its teacher)
    plan = planned_epochs(cfg, until, arms, sweep)

    def finished(root: Path, pattern: str) -> int:  # stage folders of that kind this directory holds finished
        return sum(1 for d in root.glob(pattern) if (d / P.DONE).is_file()) if root.is_dir() else 0

    def left(kind: str, done: int) -> int:
        return max(0, plan.get(kind, (0, 0))[0] - done)

    roots = [P.replicate_root(run, r) for r in range(cfg.teacher.seeds)]
    strategies = cfg.sweep.strategies if sweep else [cfg.prune.strategy]
    # A rewinding strategy keeps the teacher's weights of its rewind epoch (teacher/epoch_<e>); a
    # sweep's options are per strategy, so a sweep counts one such file.
    snapshots = sweep or any(st in SPECS and SPECS.get(st).snapshot_epoch(cfg.prune.options) is not None for st in strategies)
    unfinished = [r for r in roots if not (r / P.TEACHER / P.DONE).is_file()]
    # A loaded teacher (teacher.checkpoint) is not trained, but the run keeps its own copy.
    teachers = left("teacher", len(roots) - len(unfinished)) if "teacher" in plan else len(unfinished)
    # (A sweep's prune/<strategy>_s<sparsity> holds its one level as level_1, counted there.)
    levels = left("pruning", sum(finished(r, f"{P.PRUNE}/**/level_*") for r in roots))
    rounds = left("control", sum(finished(r, f"{P.CONTROL}/round_*") for r in roots))
    controls = sum(1 for r in roots if "control" in plan and not (r / P.CONTROL / P.DONE).is_file())  # its final copy
    students = left("students", sum(finished(r, f"{P.DISTILL}/*") for r in roots))
    inherit = w_s if cfg.student.inherit and not (run / P.STUDENT / P.DONE).is_file() else 0  # student/init.safetensors
    kept = (teachers * w_t * (2 if snapshots and "teacher" in plan else 1) + levels * (w_t + m_t) + (rounds + controls) * w_t
            + students * w_s + inherit + (teachers + levels + rounds + controls + students) * SMALL_FILES_PER_STAGE)
    # One teacher-sized stage trains at a time; students, jobs at a time.
    peak = max(2 * w_t + m_t if teachers + levels + rounds else 0, min(students, max(1, cfg.jobs)) * 2 * w_s)
    return kept, peak


def _size(n: float) -> str:
    return gib(n) if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def check_disk_space(cfg: RunConfig, run_dir: str | Path, teacher: nn.Module, student: nn.Module | None, *,
                     sweep: bool = False, until: str = "report", arms: Sequence[str] | None = None,
                     free: int | None = None) -> None:
    """The file system of ``run_dir`` has room for what the command will write (``planned_bytes``,
    with DISK_MARGIN; ``free``: bytes, queried when None): a sweep of many students on a nearly full
    disk failed mid-run, its ENOSPC line clean but hours of training lost."""
    import shutil

    kept, peak = planned_bytes(cfg, run_dir, teacher, student, sweep=sweep, until=until, arms=arms)
    need = int((kept + peak) * DISK_MARGIN[0] + DISK_MARGIN[1])
    if kept + peak == 0:
        return
    anc = Path(run_dir).absolute()
    while not anc.exists() and anc.parent != anc:  # (made by mkdir -p: check_out_dir checked the way)
        anc = anc.parent
    if free is None:
        try:
            free = shutil.disk_usage(anc).free
        except OSError:
            return  # a file system that does not say: the writes find out, each in one line
    if free >= need:
        return
    raise PreflightError(f"run directory {run_dir}: the run will write about {_size(kept + peak)} (its weights, masks and "
                         f"training commits; {_size(need)} with a 10% + 64 MiB margin), and the file system of {anc} has "
                         f"{_size(free)} free; free space there, or pass --out a folder on a disk with more room")


def check_pruning(cfg: RunConfig, sweep: bool = False) -> None:
    """``ptd sweep`` prunes by ``sweep.strategies`` x ``sweep.sparsities``; every other command by
    ``prune.strategy`` to ``prune.target_sparsity``. Each strategy's own checks (its rewind epoch,
    GMP's ramp) are what it registered (``StrategySpec.check``); an unknown name is left to
    check_plugins, which lists the valid ones."""
    from ptd.pruning import SPECS, options_for

    p = cfg.prune
    if sweep:
        targets = [(st, cfg.sweep.sparsities, options_for(dict(p.options), st)) for st in cfg.sweep.strategies]
    else:
        keyed = sorted(k for k in p.options if k in SPECS)
        if keyed:  # a sweep's per-strategy sections: read plainly, its options went unseen ("rewind_epoch: required")
            raise ConfigError(f"prune.options.{keyed[0]}: per-strategy sections are for ptd sweep; a run of one strategy takes its "
                              f"options plainly (prune.options.<option>, e.g. --set prune.options.rewind_epoch=1)")
        targets = [(p.strategy, [p.target_sparsity], dict(p.options))]
    for st, sparsities, opts in targets:
        for s in sparsities:
            check_rounds(s, p.rate, st, f"sweep.sparsities ({st})" if sweep else "prune.target_sparsity", p.retrain.epochs)
        if st in SPECS:
            SPECS.get(st).check(st, opts, cfg)


def check_model(mc: ModelConfig, where: str, splits: Any, image_size: int | None = None) -> nn.Module:
    """Build ``mc`` for this data and run 2 blank images through it; one-line ConfigError otherwise."""
    from ptd.models import build_model

    kw = dict(mc.kwargs)

    def build(device: str | None = None) -> nn.Module:
        try:
            with torch.device(device) if device else contextlib.nullcontext():
                return build_model(mc.arch, num_classes=splits.num_classes, in_channels=splits.in_channels, width=mc.width, **kw)
        except UnknownNameError as e:
            raise ConfigError(f"{where}.arch: {e}") from None
        except (TypeError, ValueError, KeyError, AssertionError, IndexError) as e:
            raise ConfigError(f"{where}: {mc.arch} does not build with kwargs {kw!r} ({one_line(e)[:200]}); "
                              f"fix or remove the offending key in {where}.kwargs") from None

    # Its size first, on the meta device (shapes only, no memory): a width or kwarg that asks for
    # more parameters than this machine can train is refused here, not by the allocator's traceback.
    try:
        sized = build("meta")
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 -- a builder that cannot run on meta tensors is sized by the real build
        if "overflow" in str(e):  # a tensor too large for any memory's address arithmetic
            raise ConfigError(f"{where}: {mc.arch} at width {mc.width:g} asks for tensors too large to exist "
                              f"({one_line(e)[:160]}); lower {where}.width or pick a smaller model") from None
        sized = None
    if sized is not None and mc.width < 1:
        # A width that floors every conv to one channel is a typo (1e-6 for 0.25): a 56-parameter
        # teacher trained to chance without a word (bad-input audit).
        convs = [m.out_channels for m in sized.modules() if isinstance(m, nn.Conv2d)]
        if convs and max(convs) <= 1:
            raise ConfigError(f"{where}.width: {mc.width:g} leaves every one of {mc.arch}'s {len(convs)} conv layers 1 channel "
                              f"wide (a {sum(p.numel() for p in sized.parameters()):,}-parameter model, nothing to learn "
                              f"with); use a width that gives its layers channels (the demo's is 0.25)")
    if sized is not None:
        n = sum(p.numel() for p in sized.parameters())
        need, have = n * TRAINING_BYTES_PER_PARAM, memory_bytes()
        if have and need > have:
            raise ConfigError(f"{where}: {mc.arch} at width {mc.width:g} has {n:,} parameters, whose weights, gradients and "
                              f"momentum alone need {gib(need)} against this machine's {gib(have)}; lower {where}.width "
                              f"or pick a smaller model")
    try:
        # Seeded and forked: preflight's stand-in teacher (whose magnitudes shape the stand-in
        # derived student) is the same whatever ran before in this process, and the run's RNG
        # streams are untouched. Unseeded, a test suite's order once decided which masks it saw.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = build()
    except (RuntimeError, MemoryError) as e:
        if not _out_of_memory(e):
            raise
        raise ConfigError(f"{where}: {mc.arch} at width {mc.width:g} does not fit in this machine's memory "
                          f"({one_line(e)[:160]}); lower {where}.width or pick a smaller model") from None
    check_runs(model, where, splits, image_size)
    return model


def check_device_memory(model: nn.Module, where: str, device: torch.device, have: int | None = None) -> None:
    """On a GPU, the model's fp32 weights, gradients and momentum must fit in its memory (``have``:
    its total bytes, queried when None); activations come on top, so passing is necessary, not
    sufficient. Preflight builds models on the CPU, whose memory ``check_model`` already checked."""
    if device.type != "cuda":
        return
    have = gpu_memory_bytes(device) if have is None else have
    n = sum(p.numel() for p in model.parameters())
    need = n * TRAINING_BYTES_PER_PARAM
    if have and need > have:
        raise ConfigError(f"{where}: {n:,} parameters need {gib(need)} for weights, gradients and momentum alone, more "
                          f"than the {gib(have)} of {device}; use a larger GPU, a smaller {where}.width, or --device cpu")


def _out_of_memory(e: BaseException) -> bool:
    """An allocation that failed (CPU or GPU), as opposed to any other RuntimeError."""
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(e) or "out of memory" in str(e)


def check_runs(model: nn.Module, where: str, splits: Any, image_size: int | None = None) -> None:
    """One forward pass of blank images of this data's shape; the logits must be [2, num_classes]."""
    h, w = frame_size(splits, image_size)
    was = model.training
    model.eval()
    try:
        x = torch.zeros(2, splits.in_channels, h, w)
        with torch.no_grad():
            out = model(x)
    except (RuntimeError, ValueError, IndexError, MemoryError) as e:  # shape errors from too-small images or wrong channels
        if _out_of_memory(e):
            raise ConfigError(f"{where}: 2 images of {splits.in_channels}x{h}x{w} do not fit through "
                              f"{getattr(model, 'ptd_spec', {}).get('arch', type(model).__name__)} in this machine's memory "
                              f"({one_line(e)[:160]}); lower data.image_size or the model's width") from None
        raise ConfigError(f"{where}: {getattr(model, 'ptd_spec', {}).get('arch', type(model).__name__)} does not run on "
                          f"{splits.in_channels}x{h}x{w} images of {splits.name} ({one_line(e)[:200]}); pick a model "
                          f"(or kwargs) for this image size and channel count") from None
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, splits.num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"{where}: the model gives {shape} for 2 images, expected (2, {splits.num_classes}) logits "
                          f"for the {splits.num_classes} classes of {splits.name}")


def _idle_round(total: int, rate: float, target: float) -> tuple[int, int] | None:
    """The first of the rounds to ``target`` that prunes no weight (round(rate x alive) is 0), with
    the weights alive then; None if every round prunes. At most MAX_EPOCHS rounds (check_rounds)."""
    from ptd.pruning.select import rounds_for_target, survivors_after_round

    alive = total
    for k in range(1, rounds_for_target(target, rate) + 1):
        nxt = survivors_after_round(alive, rate)
        if nxt == alive:
            return k, alive
        alive = nxt
    return None


def check_no_certain_collapse(cfg: RunConfig, teacher: nn.Module, sweep: bool = False) -> None:
    """A target sparsity that keeps fewer weights than the teacher has prunable layers empties at
    least one layer whatever the scores (layer collapse): refused now, by the arithmetic alone.
    Collapse that depends on the trained weights is refused when a level's masks show it
    (ptd.pruning.masks.require_connected)."""
    from ptd.pruning.masks import prunable_weights
    from ptd.pruning.select import keep_of_total

    # counted from the weights' sizes: masks of a 600M-parameter teacher would take 600 MB to say it
    sizes = [p.numel() for p in prunable_weights(teacher, cfg.prune.exclude_first, cfg.prune.exclude_last).values()]
    if not sizes:
        # The prune stage refuses this too (even at target 0), but only after the teacher trained.
        pf, pl = cfg.prune.exclude_first, cfg.prune.exclude_last
        raise ConfigError(f"prune: the teacher has no prunable Conv/Linear weights (check prune.exclude_first / "
                          f"prune.exclude_last): {cfg.teacher.model.arch} with exclude_first={str(pf).lower()} and "
                          f"exclude_last={str(pl).lower()} leaves none; set one of them to false, or give teacher.model "
                          f"more Conv/Linear layers")
    total, layers = sum(sizes), len(sizes)
    # A round prunes round(rate x alive) weights of those still alive: under half a weight, none, and
    # every round left retrains a teacher that never gets sparser (bad-input audit: sparsity 0.0000
    # at level 415; review: rate 1e-4 to 0.8 pruned nothing from round 9,289 of 16,094 and ended at 0.65).
    from ptd.pruning import SPECS
    by_rounds = [st for st in (cfg.sweep.strategies if sweep else [cfg.prune.strategy]) if st in SPECS and SPECS.get(st).rounds]
    aim = max(cfg.sweep.sparsities if sweep else [cfg.prune.target_sparsity], default=0)
    rate = cfg.prune.rate
    if by_rounds and aim > 0 and (idle := _idle_round(total, rate, aim)) is not None:
        k, alive = idle
        least = least_shown(0.5 / alive, lambda r: _idle_round(total, r, aim) is None)  # (5,000 x 1e-4 rounds to no weight)
        raise ConfigError(f"prune.rate: {rate:g} of the {alive:,} weights still alive at round {k:,} (of the teacher's "
                          f"{total:,} prunable) is under half a weight, so that round and every one after it removes none; "
                          f"use at least {least}, typically 0.2")
    targets = [("prune.target_sparsity", cfg.prune.target_sparsity)]
    if sweep:
        targets += [("sweep.sparsities", s) for s in cfg.sweep.sparsities]
    for key, target in targets:
        keep = keep_of_total(total, target)
        if keep < layers:
            most = 1 - layers / total
            raise ConfigError(f"{key}: {target:g} keeps {keep:,} of the teacher's {total:,} prunable weights, fewer than its "
                              f"{layers} prunable layers, so at least one layer loses every weight (layer collapse); "
                              f"use at most {math.floor(most * 1e6) / 1e6:g} (one weight per layer), and far less in practice")


def check_derivable(cfg: RunConfig, teacher: nn.Module, splits: Any, sweep: bool = False,
                    device_type: str = "cpu") -> nn.Module | None:
    """With ``student.source: derive``, derive a student from the fresh teacher pruned by global
    magnitude to the run's sparsity (the largest of a sweep's), so an architecture ptd cannot derive
    from (a grouped conv, a graph Torch-Pruning cannot trace, a student that would not run) is
    refused now, not after the teacher trained and was pruned. Refusals come from the graph, not
    the trained weights; the real derivation still runs on the real pruned teacher."""
    if cfg.student.source != "derive":
        return None
    from ptd.pruning.masks import full_masks, prunable_weights
    from ptd.pruning.scores import magnitude
    from ptd.pruning.select import global_topk, keep_for_target
    from ptd.students import DerivationError, derive_configured

    target = max([cfg.prune.target_sparsity, *(cfg.sweep.sparsities if sweep else ())])
    full = full_masks(prunable_weights(teacher))
    masks = global_topk(magnitude(teacher, full), full, keep_for_target(full, target))
    try:
        with torch.random.fork_rng(devices=[]):  # the student's fresh weights: not the run's RNG streams
            sc = cfg.student  # as ptd.pipeline.stage_student derives it
            student, _ = derive_configured(teacher, masks, inherit=sc.inherit, round_to=sc.round_to,
                                           round_narrower=sc.round_narrower, device_type=device_type)
    except DerivationError as e:
        raise ConfigError(f"student.source: derive: {one_line(e)[:400]}; give a student with student.source: named and "
                          f"student.model, or a teacher ptd can derive from (docs/students.md)") from None
    return student  # a stand-in of the real one: same graph, widths from a fresh teacher's magnitudes


def activation_bytes(model: nn.Module, input_shape: tuple[int, int, int]) -> float | None:
    """Bytes autograd keeps per training image (see :func:`activation_sizes`); None: not sized."""
    sizes = activation_sizes(model, input_shape)
    return sizes[0] if sizes else None


def activation_sizes(model: nn.Module, input_shape: tuple[int, int, int]) -> tuple[float, float] | None:
    """(total, largest): the bytes autograd keeps per training image of ``input_shape`` (what the
    backward pass needs: layer inputs and outputs, pooling indices), and the largest of those
    tensors per image (an inference pass holds about two such at a time), from one train-mode
    forward of a copy built on the meta device, so nothing is allocated. None where the model
    cannot be rebuilt or run there.

    Against the peak memory growth of a real fp32 training step (channels_last, 2 threads, AMD EPYC):
    vgg19 at 3x32x32 2.70 MiB/image against 2.83 measured (batch 256), resnet18 at 3x64x64 17.9
    against 18.5 (batch 128), ptd's CIFAR-style resnet50 at 3x224x224 1192 against 976 (batch 8).
    torchvision's resnet50 at 224: 82 MiB/image."""
    from ptd.models import build_from_spec

    spec = getattr(model, "ptd_spec", None)
    if spec is None:
        return None
    kept: dict[int, int] = {}
    owned: set[int] = set()  # storages of weights and buffers (and their views, e.g. a transposed weight): sized elsewhere

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:  # views of one tensor share its storage: count the storage once
            storage = t.untyped_storage()
            if storage._cdata not in owned:
                kept[storage._cdata] = max(kept.get(storage._cdata, 0), storage.nbytes())
        except (RuntimeError, NotImplementedError, AttributeError):
            if not isinstance(t, nn.Parameter):
                kept[id(t)] = t.numel() * t.element_size()
        return t

    try:
        with torch.device("meta"), torch.random.fork_rng(devices=[]):
            m = build_from_spec(spec)
        owned.update(t.untyped_storage()._cdata for t in [*m.parameters(), *m.buffers()])
        m.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m(torch.zeros((2, *input_shape), device="meta"))  # 2: BatchNorm in training mode needs more than 1
    except Exception:  # noqa: BLE001 -- a model the meta device cannot run is not sized; training finds out
        return None
    return sum(kept.values()) / 2, max(kept.values(), default=0) / 2


def check_training_memory(cfg: RunConfig, teacher: nn.Module, student: nn.Module | None, splits: Any,
                          device: torch.device, have: int | None = None) -> None:
    """Every stage's batch must fit this machine's memory (the GPU's on a CUDA run; ``have``: bytes,
    queried when None). Past it the kernel's OOM killer ends the run mid-stage with no message,
    after the run directory was written.

    Training: the activations autograd keeps for the batch, plus the trained model's weights,
    gradients and momentum, plus a frozen teacher's weights while distilling, plus on a GPU the
    in-memory splits its loaders copy there whole. Per process: on the CPU the machine's
    ``LOCAL_WORLD_SIZE`` processes share its memory; on CUDA each has a GPU of its own (cuda:LOCAL_RANK). Evaluation (``eval_batch_size``, capped by the larger
    split; every rank the whole batch): about two of the largest activations per image and the
    input. Under native bf16 autocast half the fp32 estimate is taken, a lower bound, so a batch
    that fits is never refused."""
    have = (gpu_memory_bytes(device) if device.type == "cuda" else memory_bytes()) if have is None else have
    if not have:
        return
    world = max(1, int(os.environ.get("WORLD_SIZE", "1")))
    local = max(1, min(world, int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))))
    # A GPU holds one process's batch (it multiplied by the ranks, and refused 8 GPUs a batch each fits).
    local = 1 if device.type == "cuda" else local
    h, w = frame_size(splits, cfg.data.image_size)
    shape = (splits.in_channels, h, w)
    from ptd.train.loop import cpu_has_native_bf16, cuda_has_native_bf16

    bf16 = cfg.amp and (cuda_has_native_bf16(device.index) if device.type == "cuda" else cpu_has_native_bf16())
    scale = 0.5 if bf16 else 1.0  # bf16 autocast keeps some activations in half the bytes; half is a lower bound
    models = [teacher] + ([student] if student is not None else [])
    params = {id(m): sum(p.numel() for p in m.parameters()) for m in models}
    # (key, batch, model, extra bytes, training?)
    # TensorLoader copies an in-memory split to the device once (Tiny-ImageNet's decoded 100,000
    # images: 1.2 GiB); in host memory it is already resident, so `have` (available now) counts it.
    data = sum(t.numel() * t.element_size() for sp in (splits.train, splits.val, splits.test)
               for t in (getattr(sp, "x", None), getattr(sp, "y", None)) if isinstance(t, torch.Tensor)) if device.type == "cuda" else 0
    stages = [("teacher.optim", cfg.teacher.optim.batch_size, teacher, data, True)] if not cfg.teacher.checkpoint else []
    stages.append(("prune.retrain", cfg.prune.retrain.batch_size, teacher, data, True))
    if student is not None:
        stages.append(("distill.optim", cfg.distill.optim.batch_size, student, data + 4 * params[id(teacher)], True))
    eval_batch = min(cfg.eval_batch_size, max(len(splits.val), len(splits.test)))
    stages += [("eval_batch_size", eval_batch, m, data, False) for m in models]
    sized = {id(m): activation_sizes(m, shape) for m in models}
    for key, batch, model, extra, training in stages:
        if sized[id(model)] is None:
            continue
        total, largest = sized[id(model)]
        per_image = scale * (total if training else 2 * largest + 4 * shape[0] * h * w)  # eval: + the fp32 input batch
        fixed = TRAINING_BYTES_PER_PARAM * params[id(model)] + extra
        # batch_size is per rank (each rank loads batch_size images; the global batch is world times
        # it), so each of the machine's `local` processes holds a whole batch's activations.
        need = local * (fixed + per_image * batch)
        if need <= have:
            continue
        fits = int((have / local - fixed) // per_image) if have / local > fixed else 0
        arch = getattr(model, "ptd_spec", {}).get("arch", type(model).__name__)
        ranks = f", {local} processes on this machine" if local > 1 else ""
        where = f"the GPU's {gib(have)}" if device.type == "cuda" else f"this machine's {gib(have)}"
        images = f"images of {'x'.join(map(str, shape))} through {arch} need about {gib(need)}"
        if not training:
            fix = (f"set eval_batch_size to at most {fits}, or a smaller data.image_size or model width" if fits >= 1 else
                   "lower data.image_size or the model's width: not even one image fits")
            raise ConfigError(f"eval_batch_size: {cfg.eval_batch_size} (a batch of {batch}: the larger of the validation and "
                              f"test splits) {images} to evaluate ({per_image / 2**20:.2f} MiB per image, measured on the meta "
                              f"device{ranks}) against {where}; {fix}")
        fix = (f"use a batch of at most {fits}, or a smaller data.image_size or model width" if fits >= 1 else
               "lower data.image_size or the model's width: not even one image fits")
        held = f" and the {gib(data)} of images copied to the GPU" if data else ""
        raise ConfigError(f"{key}.batch_size: {batch} {images} to train ({per_image / 2**20:.2f} MiB of activations per image, "
                          f"measured on the meta device, plus weights, gradients and momentum{held}{ranks}) against {where}; {fix}")


def check_own_losses(cfg: RunConfig, teacher: nn.Module, student: nn.Module | None, splits: Any) -> None:
    """A loss registered outside ptd (a --plugin's) runs one training step on two blank images of
    this data before any work: one that raised, or returned a term that is not one finite number,
    failed only after the teacher and pruning had trained, called "a bug in ptd" (new-user trial).
    ptd's own losses are tested and skip this."""
    import copy
    import inspect

    from ptd.distill import LOSSES, build_distiller

    dc = cfg.distill
    own = [n for n in dc.losses if n in LOSSES and not LOSSES.get(n).__module__.startswith("ptd.")]
    if not own:
        return
    h, w = frame_size(splits, cfg.data.image_size)
    x = torch.zeros(2, splits.in_channels, h, w)
    y, index = torch.zeros(2, dtype=torch.long), torch.arange(2)
    for n in own:
        cls = LOSSES.get(n)
        where = f"distill.loss: {n!r} (from {inspect.getsourcefile(cls) or cls.__module__})"
        t = copy.deepcopy(teacher)  # a derived student keeps the teacher's module names: a copy stands in
        s = copy.deepcopy(student) if student is not None else copy.deepcopy(teacher)
        try:
            unit = build_distiller(s, t, n, options={k: v for k, v in dc.options.items() if k == n},
                                   defaults={"alpha": dc.alpha, "temperature": dc.temperature}, num_classes=splits.num_classes,
                                   num_samples=max(2, len(splits.train)), example_input=x, layer_map=dc.layer_map,
                                   batch_size=dc.optim.batch_size)
            unit.train()
            total, _, terms = unit(x, y, index, 0)
        except PtdError:
            raise
        except Exception as e:
            raise ConfigError(f"{where} raised {type(e).__name__} on a step of two blank images: {one_line(e)[:240]}; "
                              f"fix the loss (nothing was trained)") from None
        bad = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__ for k, v in terms.items()
               if not (isinstance(v, torch.Tensor) and v.numel() == 1 and v.is_floating_point())}
        if bad or not terms:
            got = ", ".join(f"{k} {v}" for k, v in bad.items()) or "no terms"
            raise ConfigError(f"{where} must return named terms that are each one number (a 0-dim float tensor), got {got} "
                              f"on a batch of 2; reduce each term over the batch (e.g. .mean())")
        if not bool(torch.isfinite(total.detach()).all()):
            raise ConfigError(f"{where} gave a non-finite loss ({float(total):g}) on two blank images; fix the loss")


def check_bridges(cfg: RunConfig, teacher: nn.Module, student: nn.Module | None, splits: Any) -> None:
    """Every distillation loss is built once on blank images of this data, so shapes a loss cannot
    bridge (e.g. FitNet between a feature map and a flat vector) fail here, not after the teacher
    trained. A derived student keeps the teacher's module names and the kind of every feature (its
    maps only narrow), so a fresh teacher of the same config stands in for it."""
    from ptd.distill import LOSSES, build_distiller, loss_options

    from ptd.distill.base import PENULTIMATE

    dc = cfg.distill
    try:
        opts = {n: loss_options(n, dc.options.get(n), {"alpha": dc.alpha, "temperature": dc.temperature}) for n in dc.losses}
    except PtdError:
        return  # unknown losses or options: check_plugins names them
    layers = [LOSSES.get(n).feature_layers(o) for n, o in opts.items()]
    if not any(t or s for t, s in layers):
        return  # logit losses: nothing to bridge
    if student is None:
        student = check_model(cfg.teacher.model, "teacher.model", splits, image_size=cfg.data.image_size)
    t_mods, s_mods = dict(teacher.named_modules()), dict(student.named_modules())
    if any(n != PENULTIMATE and n not in t_mods for t, _ in layers for n in t) or \
            any(n != PENULTIMATE and dc.layer_map.get(n, n) not in s_mods for _, s in layers for n in s):
        return  # a layer that is not there: check_plugins names it with the nearest valid names
    h, w = frame_size(splits, cfg.data.image_size)
    try:
        for n in dc.losses:  # one student per loss, as the pipeline trains them
            build_distiller(student, teacher, n, options={k: v for k, v in dc.options.items() if k == n},
                            defaults={"alpha": dc.alpha, "temperature": dc.temperature}, num_classes=splits.num_classes,
                            num_samples=max(2, len(splits.train)), example_input=torch.zeros(2, splits.in_channels, h, w),
                            layer_map=dc.layer_map, batch_size=dc.optim.batch_size)
    except (RuntimeError, MemoryError) as e:
        if not _out_of_memory(e):
            raise
        raise ConfigError(f"distill: the losses {', '.join(dc.losses)} do not fit in this machine's memory "
                          f"({one_line(e)[:160]}); lower their sizes in distill.options") from None
    except (ValueError, KeyError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"distill: {one_line(e)[:300]}; pick layers whose shapes the loss can bridge "
                          f"(distill.options.<loss>, distill.layer_map; docs/distillation.md)") from None
