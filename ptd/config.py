"""Run configuration: frozen, validated dataclasses.

Precedence: dataclass defaults, then a YAML file, then CLI overrides (``--set section.key=value``).
Unknown keys and wrong types are rejected with a one-line ``ConfigError`` naming the key, where it
came from, and the valid choices.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Union

import yaml

from ptd.errors import PtdError, one_line


class ConfigError(PtdError, ValueError):
    """A bad configuration value; the message is one line and says how to fix it."""


# ---------------------------------------------------------------- bounds on what a user may give

# Epoch counts (and epochs named by options: milestones, GMP's window, DKD's warm-up). The paper's
# longest schedule is 200 epochs; ptd's fastest measured epoch is about 1 s (CIFAR VGG19 compiled on
# an H100, docs/speed.md), so 100,000 epochs is more than a day of one stage: a larger count is a
# typo (1e20 was accepted and the run announced 100000000000000000000 epochs).
MAX_EPOCHS = 100_000
_WHY_MAX_EPOCHS = "(500x the paper's 200-epoch schedules: a longer one never finishes)"
# Teacher replicates: each trains, prunes and distills a whole teacher.
MAX_REPLICATES = 1_000
# The largest seed a user may give (config ``seed``, ``distill.seeds``, a strategy's or a loss's
# ``seed`` option): the one bound every consumer takes. stream_seed takes 2**64 - 1 and
# torch.Generator.manual_seed 2**64 - 1 too, but numpy.random.seed and RandomState stop at
# 2**32 - 1, and CRD seeds its negatives with seed * 1_000_003 + step, which must stay within
# manual_seed's 2**64 - 1.
MAX_SEED = 2**32 - 1  # config imports no other ptd module (tests/test_layers.py), so the bound lives here
_WHY_MAX_SEED = "2**32 - 1, the largest seed every random-number consumer in ptd takes"
# Any integer at all: torch and numpy hold at most a signed 64-bit one, and a larger value overflows
# mid-run (torch.Generator.manual_seed: "Overflow when unpacking long long").
MAX_INT = 2**63 - 1
# YAML structure: a config is a few levels deep and a few hundred values (the shipped ones: at
# most 6 levels, under 200 values). Past these a file is not a config: a nesting that exhausts
# Python's recursion, or aliases nested in aliases ("billion laughs") that expand a 1 KB file to
# millions of values.
MAX_DEPTH = 50
MAX_VALUES = 10_000
_STARTER = "configs/fashion_mnist_demo.yaml"


# Field metadata: what a key means, added to a type error where two keys are easily confused
# (teacher.seeds counts replicates; distill.seeds lists seeds).
MEANS = "ptd_means"


@dataclass(frozen=True)
class OptimConfig:
    """SGD with Nesterov momentum and a multi-step LR schedule (the paper's optimizer everywhere)."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    milestones: tuple[int, ...] = ()  # epochs at which lr is multiplied by gamma
    gamma: float = 0.1

    def validate(self, where: str) -> None:
        _check(self.epochs >= 1, f"{where}.epochs", self.epochs, "must be >= 1")
        _check(self.epochs <= MAX_EPOCHS, f"{where}.epochs", self.epochs, f"must be at most {MAX_EPOCHS:,} {_WHY_MAX_EPOCHS}")
        _check(self.batch_size >= 1, f"{where}.batch_size", self.batch_size, "must be >= 1")
        _check(self.lr > 0, f"{where}.lr", self.lr, "must be > 0")
        _check(0 <= self.momentum < 1, f"{where}.momentum", self.momentum, "must be in [0, 1)")
        _check(self.weight_decay >= 0, f"{where}.weight_decay", self.weight_decay, "must be >= 0")
        _check(0 < self.gamma <= 1, f"{where}.gamma", self.gamma, "must be in (0, 1]")
        # Strictly: torch's MultiStepLR applies gamma once per listed epoch, so [1, 1] gave gamma
        # squared at epoch 1 while the check read "increasing" (bad-input audit).
        ms = list(self.milestones)
        _check(all(a < b for a, b in zip(ms, ms[1:])) and all(0 < m <= MAX_EPOCHS for m in ms),
               f"{where}.milestones", ms, f"must be increasing positive epochs, each once (at most {MAX_EPOCHS:,})")
        _check(not (self.nesterov and self.momentum == 0), f"{where}.nesterov", self.nesterov,
               "Nesterov needs momentum > 0")


@dataclass(frozen=True)
class DataConfig:
    name: str = "fashion_mnist"
    root: str | None = None  # None: the dataset's default folder
    val_fraction: float = 0.1  # carved from the training set, seeded by run.seed
    train_subset: int | None = None  # keep only this many training images (demos, tests)
    test_subset: int | None = None
    download: bool = False  # fall back to torchvision's downloader into cache_dir
    cache_dir: str | None = None
    augment: bool = True
    crop_padding: int = 4  # pixels of zero padding for the random crop
    hflip: bool = True
    workers: int = 2  # DataLoader workers, folder datasets only
    image_size: int | None = None  # square side, pixels: folder images are cropped to it (None: 224), in-memory ones resized (None: their own)
    # Folder datasets: what the check before training reads of every image. headers: each format's
    # header, PNG checksums, the JPEG end marker (~0.1 s per 1,000 images and thread); full: decode
    # every pixel (1.5-4 s per 1,000 ImageNet JPEGs), so no damaged image can stop an epoch.
    check_images: str = "headers"

    def validate(self, where: str) -> None:
        _check(0 <= self.val_fraction < 1, f"{where}.val_fraction", self.val_fraction, "must be in [0, 1)")
        for k in ("train_subset", "test_subset"):
            v = getattr(self, k)
            _check(v is None or v >= 1, f"{where}.{k}", v, "must be >= 1 or null")
        _check(self.crop_padding >= 0, f"{where}.crop_padding", self.crop_padding, "must be >= 0")
        # Also checked against this machine by ptd.preflight; here so that every command (ptd eval
        # runs no preflight) refuses them at load.
        _check(self.workers >= 0, f"{where}.workers", self.workers, "must be >= 0 (0: load in the main process)")
        _check(self.image_size is None or self.image_size >= 1, f"{where}.image_size", self.image_size,
               "must be >= 1 pixel, or null for the dataset's size")
        _check(self.check_images in ("headers", "full"), f"{where}.check_images", self.check_images,
               "must be headers or full")


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "vgg11"
    width: float = 1.0  # channel multiplier
    kwargs: dict = field(default_factory=dict)  # family options, e.g. {plan: [...]} or {stem: imagenet}

    def validate(self, where: str) -> None:
        # The arch name is checked where models are built (ptd.pipeline.check_plugins): no plugin here.
        _check(self.width > 0, f"{where}.width", self.width, "must be > 0")


@dataclass(frozen=True)
class TeacherConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    checkpoint: str | None = None  # the user's trained teacher; skips training
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(epochs=200, lr=0.1, milestones=(60, 120, 160), gamma=0.2, weight_decay=5e-4))
    # Teacher replicates: how many teachers are trained (and pruned, and control-retrained), each
    # from its own seed stream, so the comparison can count the variance between teachers.
    seeds: int = field(default=1, metadata={MEANS: "the number of teacher replicates, e.g. 3, not a list: distill.seeds lists seeds"})
    # A loaded teacher (checkpoint) must score above chance on this data's validation images before
    # any work starts (ptd.preflight.check_teacher_learned): one trained on other data, or numbering
    # the classes otherwise, was pruned and taught from for the whole run (real-data audit).
    check_learned: bool = True

    def validate(self, where: str) -> None:
        _check(self.seeds >= 1, f"{where}.seeds", self.seeds, "must be >= 1 (the number of teacher replicates)")
        _check(self.seeds <= MAX_REPLICATES, f"{where}.seeds", self.seeds,
               f"must be at most {MAX_REPLICATES:,}: each replicate trains, prunes and distills a whole teacher")
        _check(not (self.checkpoint and self.seeds > 1), f"{where}.seeds", self.seeds,
               f"needs trained teachers, and {where}.checkpoint gives one; set {where}.seeds: 1 or drop the checkpoint")


# The weights a training stage ends with (ptd.train.loop.fit's ``keep``).
CHECKPOINTS = ("last", "best")


@dataclass(frozen=True)
class PruneConfig:
    strategy: str = "imp"  # iterative magnitude pruning with learning-rate rewinding
    target_sparsity: float = 0.59  # fraction of conv+linear weights removed
    rate: float = 0.2  # fraction of the surviving weights removed per round
    exclude_first: bool = False  # the paper prunes the first conv too
    exclude_last: bool = False  # ... and the classifier
    retrain: OptimConfig = field(default_factory=lambda: OptimConfig(epochs=130, lr=0.1, milestones=(39, 84), gamma=0.1, weight_decay=2e-4))
    # The weights each retraining round (and each round of the control) ends with, which the next
    # round prunes and the student is distilled from: "last", the last epoch's, as the published
    # code (it reloads the best-validation epoch after pre-training only); "best", the
    # best-validation epoch's, as the teacher and the students end.
    retrain_checkpoint: str = "last"
    options: dict = field(default_factory=dict)  # strategy-specific options

    def validate(self, where: str) -> None:
        # The strategy name and its options are checked by ptd.pruning when the strategy is built
        # (and by ptd.pipeline.check_plugins before a run starts): no plugin here.
        _check(0 <= self.target_sparsity < 1, f"{where}.target_sparsity", self.target_sparsity, "must be in [0, 1)")
        _check(0 < self.rate < 1, f"{where}.rate", self.rate, "must be in (0, 1)")
        _check(self.retrain_checkpoint in CHECKPOINTS, f"{where}.retrain_checkpoint", self.retrain_checkpoint,
               f"must be one of {', '.join(CHECKPOINTS)} (last: the published code's)")


MAX_ROUND_TO = 1024


@dataclass(frozen=True)
class StudentConfig:
    source: str = "derive"  # "derive" (widths from the pruned teacher) or "named" (use model below)
    model: ModelConfig | None = None
    inherit: bool = False  # start from the surviving teacher channels instead of fresh weights
    # Derived widths to the nearest multiple of this; 1: the paper's rule exactly. "auto": the
    # coarsest of the device's measured multiples that keeps the student within 10% of the
    # surviving weights (CPU 8; CUDA 32, else 8: benchmarks/student_speed.py,
    # ptd.students.derive.AUTO_ROUND_TO).
    round_to: int | str = "auto"
    # Where that multiple is the teacher's own width (a 16-wide layer the rule takes to 12): True
    # takes the multiple below (8), False keeps the exact width, which runs in the teacher's 16-wide
    # blocks and made the demo's student slower than its teacher in bf16 (benchmarks/student_speed.py).
    round_narrower: bool = True

    def validate(self, where: str) -> None:
        _check(self.source in ("derive", "named"), f"{where}.source", self.source, "must be 'derive' or 'named'")
        if isinstance(self.round_to, str):
            _check(self.round_to == "auto", f"{where}.round_to", self.round_to,
                   "must be an integer >= 1 (1: the paper's exact rule) or auto (the device's measured multiple)")
        else:
            _check(self.round_to >= 1, f"{where}.round_to", self.round_to, "must be >= 1")
            # The blocked kernels that rounding serves want multiples of 8 to 128 channels (oneDNN,
            # cuDNN tensor cores); a multiple past any layer's width would only round to the floor.
            _check(self.round_to <= MAX_ROUND_TO, f"{where}.round_to", self.round_to,
                   f"must be at most {MAX_ROUND_TO} (auto is the default: 8 on a CPU, 32 on a GPU; 1 is the paper's exact rule)")
        if self.source == "named" and self.model is None:
            raise ConfigError(f"{where}.model: required when {where}.source is 'named' (e.g. model: {{arch: vgg11}})")
        # A key the chosen source never reads would be silently ignored: the run would not be the one asked for.
        if self.source == "derive" and self.model is not None:
            raise ConfigError(f"{where}.model: given, but {where}.source is 'derive' (the widths come from the pruned "
                              f"teacher, so the model is not used); set {where}.source: named to train this model, or "
                              f"{where}.model: null")
        if self.source == "named" and self.inherit:
            raise ConfigError(f"{where}.inherit: true, but {where}.source is 'named' (only a derived student can start "
                              f"from the teacher's surviving channels); set {where}.inherit: false, or {where}.source: derive")


@dataclass(frozen=True)
class Arm:
    label: str  # how reports name it
    teacher: str | None  # who teaches the student: None (plain cross-entropy), unpruned, pruned, retrained


# The one table of arms: adding an arm is one entry here (plus, for a new kind of teacher, the
# stage that makes it in ptd.pipeline.run_pipeline).
ARM_TABLE = {
    "scratch": Arm("student alone (no teacher)", None),
    "unpruned_teacher": Arm("distilled from unpruned teacher", "unpruned"),
    "pruned_teacher": Arm("distilled from pruned teacher", "pruned"),
    # The control: the unpruned teacher trained on for as many rounds and epochs as pruning
    # retrained the pruned one, with the optimizer the strategy's rounds use (retrain_optim), no
    # pruning. Without it a pruned teacher that teaches better may just be a longer-trained teacher.
    "retrained_teacher": Arm("distilled from unpruned teacher retrained as long (control)", "retrained"),
}
ARMS = tuple(ARM_TABLE)
DEFAULT_ARMS = ARMS[:3]


# The largest softmax temperature a logit-distillation loss accepts (KD, DKD, DIST). Past it
# float32 cannot resolve softmax(logits / T) and the T^2-scaled KL is rounding. Measured on three
# draws of 128 x 100 random logits (std 5) against the T -> infinity limit (logit matching):
# within 0.1% at T = 100, within 0.2% at 1000, off by 1-10% at 1e4 and up to 85% at 3e4; on
# 64 x 10 logits the KL came out negative (-163) at 1e5. The limit is reached well below the
# bound, so no behaviour is lost.
MAX_TEMPERATURE = 1000.0


@dataclass(frozen=True)
class DistillConfig:
    # A registered loss name (ptd.distill.LOSSES), or a list of them: every teacher arm is then
    # distilled with each listed loss in turn (the scratch arm once), compared per loss.
    loss: str | tuple[str, ...] = "kd"
    # kd's alone (the paper's loss; a loss lists the distill keys it takes in distill_keys): alpha
    # weighs the soft (KL) term, temperature is T. distill.options.kd overrides them; other losses'
    # options of the same name keep their own defaults.
    alpha: float = 0.95
    temperature: float = 10.0
    # {loss name: {option: value}}: validated by that loss's typed Options when it is built.
    options: dict = field(default_factory=dict)
    # {layer name a loss reads on the student: the student's own module name}; for a named student
    # whose modules are not named as the teacher's (derived students keep the names).
    layer_map: dict = field(default_factory=dict)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(epochs=200, lr=0.1, milestones=(60, 120, 160), gamma=0.2, weight_decay=5e-4))
    seeds: tuple[int, ...] = field(default=(0, 1), metadata={MEANS: "the list of student seeds, e.g. [0, 1, 2, 3, 4]"})
    arms: tuple[str, ...] = DEFAULT_ARMS

    @property
    def losses(self) -> tuple[str, ...]:
        return (self.loss,) if isinstance(self.loss, str) else tuple(self.loss)

    def folder_loss(self, loss: str | None) -> str | None:
        """The loss a student's folder is named after (ptd.paths.distill_dir): None for the first
        loss, which keeps the one-loss names (so a run grown by more losses keeps its students),
        and for the scratch arm (no loss)."""
        return None if loss in (None, self.losses[0]) else loss

    def student_name(self, arm: str, loss: str | None) -> str:
        """A student's name in logs: its arm, with the loss where the run distills with several."""
        return arm if loss is None or len(self.losses) == 1 else f"{arm}-{loss}"

    def validate(self, where: str) -> None:
        # Loss names and options are checked by ptd.distill where the losses are built (and by
        # ptd.pipeline.check_plugins before a run starts): the config imports no plugin.
        _check(len(self.losses) >= 1 and len(set(self.losses)) == len(self.losses), f"{where}.loss", self.loss,
               "must be a loss name or a non-empty list of distinct names")
        for k, v in self.options.items():
            _check(isinstance(v, dict), f"{where}.options.{k}", v, "must be a mapping of that loss's options")
        for k, v in self.layer_map.items():
            _check(isinstance(k, str) and isinstance(v, str) and bool(k.strip()) and bool(v.strip()), f"{where}.layer_map", {k: v},
                   "must map layer names to module names (non-empty strings)")
        _check(0 <= self.alpha <= 1, f"{where}.alpha", self.alpha, "must be in [0, 1]")
        _check(self.temperature > 0, f"{where}.temperature", self.temperature, "must be > 0")
        _check(self.temperature <= MAX_TEMPERATURE, f"{where}.temperature", self.temperature,
               f"must be at most {MAX_TEMPERATURE:g}: beyond, float32 cannot resolve softmax(logits / T) and KD's loss is rounding noise")
        _check(len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds), f"{where}.seeds", list(self.seeds), "must be a non-empty list of distinct ints")
        for sd in self.seeds:
            _check(0 <= sd <= MAX_SEED, f"{where}.seeds", sd, f"each seed must be >= 0 and at most {MAX_SEED} ({_WHY_MAX_SEED})")
        _check(len(self.arms) >= 1, f"{where}.arms", list(self.arms), f"must list at least one arm of {', '.join(ARMS)}")
        for a in self.arms:
            _check(a in ARMS, f"{where}.arms", a, f"each arm must be one of {', '.join(ARMS)}")
        _check(len(set(self.arms)) == len(self.arms), f"{where}.arms", list(self.arms), "must list each arm once")


@dataclass(frozen=True)
class SweepConfig:
    """`ptd sweep`: teachers at several sparsities (and strategies), all distilled into one student."""

    sparsities: tuple[float, ...] = (0.36, 0.59, 0.79)
    strategies: tuple[str, ...] = ("imp",)
    # The student every teacher is distilled into: derived from the teacher pruned to this
    # sparsity by the first strategy (null: the highest sweep sparsity), unless student.source
    # is 'named'.
    student_from: float | None = None

    def validate(self, where: str) -> None:
        _check(len(self.sparsities) >= 1, f"{where}.sparsities", list(self.sparsities), "must list at least one sparsity")
        for s in self.sparsities:
            _check(0 < s < 1, f"{where}.sparsities", s, "each must be in (0, 1)")
        _check(len(self.strategies) >= 1, f"{where}.strategies", list(self.strategies), "must list at least one strategy")
        _check(self.student_from is None or 0 < self.student_from < 1, f"{where}.student_from", self.student_from, "must be in (0, 1) or null")


# torch.compile of the networks a training unit runs (ptd.train.loop.Runtime.compile). "off": eager.
# "reduce-overhead" adds CUDA graphs: on an H100 the CIFAR VGG19 step at batch 128 went from 12.0 to
# 2.5 ms (benchmarks/results/gpu/amp_compile.json), where eager is bound by kernel launches.
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
# The config sections a run made --from another may change (ptd.pipeline.check_reuse): what comes
# after the teacher, pruning and control it copies, and the run's name.
REUSE_FREE = ("student", "distill", "sweep", "name")


def reuse_free_text() -> str:
    """REUSE_FREE for messages and --help: "student, distill, sweep and name"."""
    return ", ".join(REUSE_FREE[:-1]) + " and " + REUSE_FREE[-1]


MAX_JOBS = 256  # worker processes; preflight also holds jobs to this machine's CPUs


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    seed: int = 0  # teacher init, data split and teacher data order
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # bfloat16 autocast on GPUs (compute capability 8.0+) and CPUs (AVX512-BF16/AMX) with native bf16
    channels_last: bool = True  # NHWC: about 2x faster convs on CPU and tensor cores on GPU
    # CPU: small-image conv weight gradients as one GEMM (ptd.train.fastconv; docs/speed.md)
    fast_wgrad: bool = True
    # torch.compile while training: off | default | reduce-overhead (CUDA graphs) | max-autotune.
    # Off by default: it pays on a GPU over a long schedule, not on a CPU (docs/speed.md).
    compile: str = "off"
    quiet: bool = False  # no progress bars (CI)
    eval_batch_size: int = 512
    threads: int | None = None  # torch CPU threads; None: torch's default
    # CPU: students (of ptd run/distill, and of ptd sweep) trained this many at a time, each in its
    # own process on threads / jobs threads (ptd.jobs; docs/speed.md). Results are those of a
    # 1-job run on that many threads.
    jobs: int = 1
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def validate(self) -> "RunConfig":
        _check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), "device", self.device, "must be auto, cpu, cuda or cuda:N")
        _check(self.compile in COMPILE_MODES, "compile", self.compile, f"must be one of {', '.join(COMPILE_MODES)}")
        _check(self.eval_batch_size >= 1, "eval_batch_size", self.eval_batch_size, "must be >= 1")
        _check(0 <= self.seed <= MAX_SEED, "seed", self.seed, f"must be >= 0 and at most {MAX_SEED} (it is the root of every random "
               f"stream; {_WHY_MAX_SEED})")
        _check(self.threads is None or self.threads >= 1, "threads", self.threads, "must be >= 1, or null for torch's default")
        _check(1 <= self.jobs <= MAX_JOBS, "jobs", self.jobs, f"must be between 1 and {MAX_JOBS} (students trained at a time)")
        check_name(self.name)
        self.data.validate("data")
        self.teacher.model.validate("teacher.model")
        self.teacher.validate("teacher")
        self.teacher.optim.validate("teacher.optim")
        self.prune.validate("prune")
        self.prune.retrain.validate("prune.retrain")
        self.student.validate("student")
        if self.student.model is not None:
            self.student.model.validate("student.model")
        self.distill.validate("distill")
        self.distill.optim.validate("distill.optim")
        self.sweep.validate("sweep")
        return self


FLOAT32_MAX = 3.4028234663852886e38  # numpy.finfo(numpy.float32).max
FLOAT32_TINY = 1.1754943508222875e-38  # its smallest normal number


def _check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {value!r} {why}")


def check_name(name: str) -> None:
    """The run name becomes the folder runs/<name> when --out is not given: one plain folder name."""
    bad = ("is empty" if not name.strip() else
           "holds a path separator" if "/" in name or "\\" in name else
           "is '.' or '..'" if name in (".", "..") else
           "holds a control character (a newline?)" if any(ord(c) < 32 or ord(c) == 127 for c in name) else
           "is longer than 255 bytes" if len(name.encode("utf-8", "surrogateescape")) > 255 else None)
    if bad:
        raise ConfigError(f"name: {name!r} {bad}, and it names the folder runs/<name>; give a plain folder name (e.g. name: "
                          f"my_run), or choose any location with --out")


def check_sweep(cfg: "RunConfig") -> None:
    """What ``ptd sweep`` cannot do with a config ``ptd run`` can: list an arm the sweep never runs."""
    # docs/sweep.md: the control (a dense teacher retrained as long) is not part of a sweep, whose
    # rows are the pruned teachers themselves; a listed control would be silently dropped.
    if "retrained_teacher" in cfg.distill.arms:
        rest = [a for a in cfg.distill.arms if a != "retrained_teacher"]
        raise ConfigError(f"distill.arms: {list(cfg.distill.arms)} lists retrained_teacher, and a sweep has no control arm "
                          f"(docs/sweep.md); drop it for the sweep (--set 'distill.arms=[{', '.join(rest or DEFAULT_ARMS)}]'), "
                          f"or run the control with ptd run")


# ---------------------------------------------------------------- dict <-> dataclass


# A decimal number in exponent notation: what YAML 1.1 leaves a string when it has no dot (5e-4).
_FLOAT_LITERAL = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _shown(value: Any) -> str:
    """A wrong value as a message quotes it; an absent one (``key:`` in YAML, ``--set key=``) says so."""
    return "no value (null); write one after the key" if value is None else repr(value)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key, source)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} ({source}): expected a mapping of {tp.__name__} keys, got {_shown(value)}")
        return from_dict(tp, value, key, source)
    if origin is tuple:
        (elem, _) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            # An example of the list's own kind: distill.arms=scratch was told "write e.g. [1, 2]" (new-user trial).
            example = "[1, 2]" if elem in (int, float) else f"[{value}]" if isinstance(value, str) and value else "[a, b]"
            got = "no value (null)" if value is None else repr(value)
            raise ConfigError(f"{key} ({source}): expected a list, got {got}; write e.g. {example}")
        return tuple(_coerce(elem, v, f"{key}[{i}]", source) for i, v in enumerate(value))
    if tp is dict or origin is dict:
        if value is None:  # "write one after the key" did not say that {} is the empty one (new-user trial)
            raise ConfigError(f"{key} ({source}): expected a mapping, got no value (null); write {{}} for an empty one")
        if not isinstance(value, dict):
            raise ConfigError(f"{key} ({source}): expected a mapping, got {_shown(value)}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} ({source}): expected true or false, got {_shown(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} ({source}): expected an integer, got {_shown(value)}")
        if not -MAX_INT <= value <= MAX_INT:
            raise ConfigError(f"{key} ({source}): {value} is beyond the largest integer torch and numpy hold ({MAX_INT}); "
                              f"give a value in this key's range")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_LITERAL.fullmatch(value.strip()):
            # PyYAML reads 5e-4 and 1e3 (no dot) as strings, unlike YAML 1.2 and every JSON or
            # Python user; the number they meant is taken.
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} ({source}): expected a number, got {_shown(value)}")
        # No key means anything at nan or +-inf (YAML's .nan/.inf): such a value passes every range
        # check written as a comparison (inf > 0) or fails it with a confusing bound, and surfaces
        # mid-run as an overflow or a nan loss.
        if not math.isfinite(value):
            raise ConfigError(f"{key} ({source}): expected a finite number, got {value!r}")
        # Training runs in float32: a learning rate, decay or loss weight past its range overflows
        # (or, below its smallest normal number, becomes 0 or loses its precision) once torch
        # multiplies it into a tensor, mid-run and after earlier stages trained.
        if abs(value) > FLOAT32_MAX or 0 < abs(value) < FLOAT32_TINY:
            raise ConfigError(f"{key} ({source}): {value!r} is outside float32's range, which training computes in "
                              f"(0 or {FLOAT32_TINY:.2e} to {FLOAT32_MAX:.2e} in size); give a value in this key's range")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} ({source}): expected a string, got {_shown(value)}")
        return value
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)}")


def from_dict(cls: type, data: dict, prefix: str = "", source: str = "config") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in fields:
            # A key with spaces or unprintable characters in it is quoted: "teacher  (config)" hid its space.
            shown = key if isinstance(k, str) and k == k.strip() and k.isprintable() and k else repr(key)
            raise ConfigError(f"{shown} ({source}): unknown key; valid keys{' under ' + prefix if prefix else ''}: {', '.join(fields)}")
        try:
            kwargs[k] = _coerce(hints[k], v, key, source)
        except ConfigError as e:
            means = fields[k].metadata.get(MEANS)
            if means is None:
                raise
            raise ConfigError(f"{e} ({key} is {means})") from None
    return cls(**kwargs)


def to_dict(cfg: Any) -> Any:
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("kwargs", "options", "layer_map"):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


# ---------------------------------------------------------------- reading YAML


class _Refused(Exception):
    """A YAML text that is no config (duplicate keys, too deep, too large). The message completes
    "the YAML ..." (a file) or "the value ..." (a --set value) with the problem and the fix."""

    def __init__(self, message: str, line: int | None):
        super().__init__(message)
        self.line = line


def _line(node_or_mark: Any) -> int | None:
    mark = getattr(node_or_mark, "start_mark", node_or_mark)
    return mark.line + 1 if mark is not None else None


def _children(node: yaml.Node) -> list:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _check_expanded(root: yaml.Node) -> None:
    """Refuse a document whose tree, with every alias expanded, is deeper than MAX_DEPTH, holds
    more than MAX_VALUES values or contains itself. Measured on the composed node graph, where an
    alias is a shared node, with each node's size memoized: a file of nested aliases is refused
    without ever being expanded. Iterative, so a long chain of aliases cannot exhaust the stack."""
    done: dict[int, tuple[int, int]] = {}  # id(node) -> (values, depth) of its expansion
    open_: set[int] = set()  # nodes on the current path: meeting one again is a cycle
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finish = stack.pop()
        if finish:
            kids = [done[id(k)] for k in _children(node)]
            values, depth = 1 + sum(v for v, _ in kids), 1 + max((d for _, d in kids), default=0)
            open_.discard(id(node))
            if depth > MAX_DEPTH:
                raise _Refused(f"is nested more than {MAX_DEPTH} levels deep once its aliases are expanded; a config is a few "
                               f"levels deep: flatten it", _line(node))
            if values > MAX_VALUES:
                raise _Refused(f"holds more than {MAX_VALUES:,} values once its aliases are expanded (aliases repeated inside "
                               f"aliases?); a config holds a few hundred: write them out", _line(node))
            done[id(node)] = (values, depth)
            continue
        if id(node) in done:
            continue
        if id(node) in open_:
            raise _Refused("has an alias inside the list or mapping it refers to, which never ends; remove that alias", _line(node))
        open_.add(id(node))
        stack.append((node, True))
        stack += [(k, False) for k in _children(node) if id(k) not in done]


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader (no tags that build objects or run code) that also refuses what a
    config never is: a key given twice in one mapping (PyYAML keeps the last silently, so a second
    ``teacher:`` block replaced the first), nesting deeper than MAX_DEPTH (caught while composing,
    before Python's recursion limit), and alias expansions past MAX_VALUES values or cycles."""

    # YAML 1.1 (PyYAML's) reads yes/no/on/off/y/n as booleans, so ``compile: off`` and
    # ``--set compile=off`` were refused as "expected a string, got False" (helper audit), and a
    # string key given ``no`` became False. Only true/false are booleans here, as in YAML 1.2 and
    # JSON: a bool key given ``on`` is told "expected true or false, got 'on'".
    yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in rs if tag != "tag:yaml.org,2002:bool"]
        for first, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def compose_node(self, parent, index):  # noqa: ANN001 -- PyYAML's signature
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(f"is nested more than {MAX_DEPTH} levels deep; a config is a few levels deep: flatten it",
                               _line(self.peek_event()))
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_data(self):
        node = self.get_single_node()
        if node is None:
            return None
        _check_expanded(node)
        return self.construct_document(node)

    def construct_mapping(self, node, deep=False):  # noqa: ANN001 -- PyYAML's signature
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *base": keys given here override the merged ones
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    twice = key in first
                except TypeError:  # an unhashable key: PyYAML refuses it below
                    continue
                if twice:
                    raise _Refused(f"gives key {key!r} twice in one mapping (first on line {first[key]}), and YAML would keep "
                                   f"only the last, silently; keep one", _line(key_node))
                first[key] = _line(key_node)
        return super().construct_mapping(node, deep=deep)


_ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _read_yaml(text: str) -> Any:
    """``text`` parsed by _ConfigLoader. Raises yaml.YAMLError (bad syntax) or _Refused."""
    loader = _ConfigLoader(text)
    try:
        return loader.get_single_data()
    except (ValueError, OverflowError) as e:
        # A scalar constructor's own refusal, e.g. an integer past Python's 4,300-digit limit
        # (PyYAML's int constructor raises it bare, not as a YAMLError).
        if "digits" in str(e):
            raise _Refused("holds an integer of more than 4,300 digits, which no key takes; write a smaller number", None) from None
        raise _Refused(f"holds a value that cannot be read ({one_line(e)[:160]}); write a valid one", None) from None
    finally:
        loader.dispose()


def _quoted(text: str, limit: int = 80) -> str:
    """An override as a message quotes it: cut past ``limit`` characters (a 5,000-digit value
    would make the one line a page)."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {_quoted(text)}: expected KEY=VALUE, e.g. --set distill.alpha=0.9")
    key, raw = text.split("=", 1)
    keys = key.strip().split(".")
    if not all(k.strip() for k in keys):
        raise ConfigError(f"override {_quoted(text)}: {'no key' if not key.strip() else f'the key {key.strip()!r} has an empty part'} "
                          f"before '='; expected KEY=VALUE with a dotted key, e.g. --set distill.alpha=0.9")
    if any(k != k.strip() for k in keys):
        # 'teacher .optim.lr' was "teacher  (command line): unknown key", the space unseen (bad-input audit)
        spaced = next(k for k in keys if k != k.strip())
        fixed = '.'.join(k.strip() for k in keys) + "=" + raw
        raise ConfigError(f"override {_quoted(text)}: the key part {spaced!r} has spaces around it; write the key without "
                          f"them: --set {_quoted(fixed)}")
    if not raw.strip():
        # Not null: for an optional key null means "unset", and `--set data.root=` (a variable that
        # expanded to nothing) trained silently on the default data. Unsetting is said in words.
        raise ConfigError(f"override {_quoted(text)}: no value after '='; give one (e.g. {key.strip()}=VALUE), or "
                          f"{key.strip()}=null to unset an optional key")
    try:
        value = _read_yaml(raw)
    except _Refused as e:
        raise ConfigError(f"override {_quoted(text)}: the value {e}") from None
    except yaml.YAMLError:
        value = raw
    return keys, value


def _overrides(overrides: list[str]) -> dict:
    """``a.b=value`` texts as one nested mapping. A key given again replaces its value (the last
    wins, like any repeated flag); a key that is also a section of another override is refused
    (``teacher=1`` and ``teacher.optim.lr=2``: which one is meant cannot be told)."""
    given: dict[tuple[str, ...], tuple[str, Any]] = {}
    for text in overrides:
        keys, value = parse_override(text)
        path = tuple(keys)
        for other, (other_text, _) in given.items():
            short, long_ = sorted((path, other), key=len)
            if path != other and long_[:len(short)] == short:
                raise ConfigError(f"overrides {_quoted(other_text)} and {_quoted(text)} conflict: one sets {'.'.join(short)} and the other a key "
                                  f"inside it ({'.'.join(long_)}); give only one of them")
        given.pop(path, None)
        given[path] = (text, value)
    over: dict = {}
    for path, (_, value) in given.items():
        d = over
        for k in path[:-1]:
            d = d.setdefault(k, {})
        d[path[-1]] = value
    return over


# A real config is a few KB (configs/: 3 KB at most). PyYAML parses in pure Python, about 4 MB/s:
# a 600 MB file (one comment line) was read whole and parsed for minutes without a word (bad-input
# audit). 1 MiB parses in a quarter of a second. A run's recorded config.yaml is held to the same
# bound (ptd.io.MAX_YAML_BYTES; config imports no ptd module but errors).
MAX_CONFIG_BYTES = 2**20


def read_config_text(p: Path) -> str:
    """The text of the config file ``p``, read only up to MAX_CONFIG_BYTES (+1, to tell a larger
    file); a one-line ConfigError for a larger file, one this user cannot read, or one that is not
    UTF-8 text (a binary, a checkpoint passed by mistake). What ``ptd`` (cli) and load_config both read it by."""
    try:
        with open(p, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
            size = os.fstat(f.fileno()).st_size
        if len(data) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{p}: {max(size, len(data)):,} bytes, more than a config can be (at most {MAX_CONFIG_BYTES:,}; "
                              f"a real one is a few KB), so it was not read; pass a YAML config (see configs/)")
        return data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot be read as a YAML text file ({type(e).__name__}: {e}); pass a YAML config (see configs/)") from None


def _read_file(p: Path) -> dict:
    """The top-level mapping of the config file ``p``; a one-line ConfigError otherwise."""
    text = read_config_text(p)
    try:
        loaded = _read_yaml(text)
    except _Refused as e:
        raise ConfigError(f"{p}{f' line {e.line}' if e.line else ''}: the YAML {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}{where}: not valid YAML ({getattr(e, 'problem', e)}); fix the syntax") from None
    if loaded is None or loaded == {}:
        # Not "all defaults": those train VGG11 for 200 epochs on the whole dataset.
        raise ConfigError(f"{p}: an empty config (no keys); start from {_STARTER}")
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of config sections")
    return loaded


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Defaults, then the YAML file at ``path``, then ``overrides`` ("a.b=value")."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            if p.exists():  # a folder, a FIFO, a device: "not found" would send the user looking for a typo
                what = "a folder" if p.is_dir() else "not a regular file (a FIFO, socket or device)"
                raise ConfigError(f"config {p} is {what}; pass the path of a YAML file (see configs/)")
            try:  # a link loop, or a link whose target is gone, was "not found" too (bad-input audit, F6's class)
                os.stat(p)
            except FileNotFoundError:
                if os.path.islink(p):
                    raise ConfigError(f"config {p} is a symbolic link to {os.readlink(p)}, which does not exist; fix the link "
                                      f"or pass the path of a YAML file (see configs/)") from None
            except OSError as e:
                raise ConfigError(f"config {p} cannot be opened ({e.strerror or type(e).__name__}); pass the path of a YAML "
                                  f"file (see configs/)") from None
            raise ConfigError(f"config file not found: {p}; pass the path of a YAML file (see configs/)")
        data = _read_file(p)
        source = str(p)
        data.setdefault("name", p.stem)
    cfg = from_dict(RunConfig, data, "", source)
    over = _overrides(list(overrides))
    if over:
        cfg = from_dict(RunConfig, _merge(to_dict(cfg), over), "", "command line")
    try:
        return absolute_paths(cfg.validate())
    except ConfigError as e:
        where = source + (" + command line" if over else "")
        raise ConfigError(f"{e} (from {where})") from None


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """``cfg`` with its file paths (data.root, data.cache_dir, teacher.checkpoint) made absolute
    against the current folder, as they are opened: the run directory's config.yaml then names
    the same files whichever folder a re-run, a ``--from`` or ``ptd compare`` starts in (a relative
    'teacher.safetensors' recorded in /x meant another file, or none, in /y)."""
    def ab(p: str | None) -> str | None:
        return os.path.abspath(os.path.expanduser(p)) if p else p

    return replace(cfg, data=replace(cfg.data, root=ab(cfg.data.root), cache_dir=ab(cfg.data.cache_dir)),
                   teacher=replace(cfg.teacher, checkpoint=ab(cfg.teacher.checkpoint)))


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# Keys added after runs were written, each with the value that matches what the code before it
# did: an older run's config.yaml without the key compares as that value, never as today's
# default (a resume is told "prune.retrain_checkpoint: 'best' there, 'last' now", and --set
# puts it back), so an older run is never continued under another behaviour, nor reported as one.
# The list is every key a committed run's config.yaml (benchmarks/results/*/config.yaml; the first,
# fashion_mnist_lowdata, at 3e1b971) lacks (tests/test_compare.py, tests/test_reuse.py). A key whose
# default is the old behaviour is listed too: without it ``ptd compare`` prints "(not set)" against
# the value, a resume reads None against it (compile was refused as "None there, 'off' now"), and
# a later change of the default would silently recast the old run.
ADDED_KEYS: dict[tuple[str, ...], Any] = {
    ("student", "round_narrower"): False,  # 8e698aa added it off; 5c462c7 turned it on
    ("fast_wgrad",): False,  # 3a7ddf4: before it, CPU conv weight gradients were oneDNN's own
    ("compile",): "off",  # ad8d3e0: before it, nothing was compiled
    ("jobs",): 1,  # add7f0d: before it, students trained one at a time in the run's process
    ("prune", "retrain_checkpoint"): "best",  # 47ffc5b: rounds had ended on their best-validation weights
    # faa20e5: headers was the check before the key (runs before 233e690 checked no image at all,
    # and only folder datasets are checked; the key may differ on resume either way)
    ("data", "check_images"): "headers",
    ("teacher", "check_learned"): False,  # 14543e7: before it, a loaded teacher was not scored before work
}


def with_added_keys(old: dict) -> dict:
    """An earlier run's config mapping (config.yaml as read) with the keys added since it was
    written filled in as ``ADDED_KEYS`` says: the behaviour it ran with. A section that is not a
    mapping is left as it is (the config check names it); ``old`` itself is not changed."""
    old = dict(old)
    for path, was in ADDED_KEYS.items():
        node = old
        for section in path[:-1]:
            if not isinstance(node.get(section), dict):
                break
            node[section] = node = dict(node[section])
        else:
            node.setdefault(path[-1], was)
    return old
