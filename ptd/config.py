"""Run configuration: frozen, validated dataclasses.

Precedence: dataclass defaults, then a YAML file, then CLI overrides (``--set section.key=value``).
Unknown keys and wrong types are rejected with a one-line ``ConfigError`` naming the key, where it
came from, and the valid choices.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from ptd.errors import PtdError


class ConfigError(PtdError, ValueError):
    """A bad configuration value; the message is one line and says how to fix it."""


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
        _check(self.batch_size >= 1, f"{where}.batch_size", self.batch_size, "must be >= 1")
        _check(self.lr > 0, f"{where}.lr", self.lr, "must be > 0")
        _check(0 <= self.momentum < 1, f"{where}.momentum", self.momentum, "must be in [0, 1)")
        _check(self.weight_decay >= 0, f"{where}.weight_decay", self.weight_decay, "must be >= 0")
        _check(0 < self.gamma <= 1, f"{where}.gamma", self.gamma, "must be in (0, 1]")
        _check(list(self.milestones) == sorted(self.milestones) and all(m > 0 for m in self.milestones),
               f"{where}.milestones", list(self.milestones), "must be increasing positive epochs")
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
    image_size: int | None = None  # folder datasets only

    def validate(self, where: str) -> None:
        _check(0 <= self.val_fraction < 1, f"{where}.val_fraction", self.val_fraction, "must be in [0, 1)")
        for k in ("train_subset", "test_subset"):
            v = getattr(self, k)
            _check(v is None or v >= 1, f"{where}.{k}", v, "must be >= 1 or null")
        _check(self.crop_padding >= 0, f"{where}.crop_padding", self.crop_padding, "must be >= 0")


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
    seeds: int = 1

    def validate(self, where: str) -> None:
        _check(self.seeds >= 1, f"{where}.seeds", self.seeds, "must be >= 1 (the number of teacher replicates)")
        _check(not (self.checkpoint and self.seeds > 1), f"{where}.seeds", self.seeds,
               f"needs trained teachers, and {where}.checkpoint gives one; set {where}.seeds: 1 or drop the checkpoint")


@dataclass(frozen=True)
class PruneConfig:
    strategy: str = "imp"  # iterative magnitude pruning with learning-rate rewinding
    target_sparsity: float = 0.59  # fraction of conv+linear weights removed
    rate: float = 0.2  # fraction of the surviving weights removed per round
    exclude_first: bool = False  # the paper prunes the first conv too
    exclude_last: bool = False  # ... and the classifier
    retrain: OptimConfig = field(default_factory=lambda: OptimConfig(epochs=130, lr=0.1, milestones=(39, 84), gamma=0.1, weight_decay=2e-4))
    options: dict = field(default_factory=dict)  # strategy-specific options

    def validate(self, where: str) -> None:
        # The strategy name and its options are checked by ptd.pruning when the strategy is built
        # (and by ptd.pipeline.check_plugins before a run starts): no plugin here.
        _check(0 <= self.target_sparsity < 1, f"{where}.target_sparsity", self.target_sparsity, "must be in [0, 1)")
        _check(0 < self.rate < 1, f"{where}.rate", self.rate, "must be in (0, 1)")


@dataclass(frozen=True)
class StudentConfig:
    source: str = "derive"  # "derive" (widths from the pruned teacher) or "named" (use model below)
    model: ModelConfig | None = None
    inherit: bool = False  # start from the surviving teacher channels instead of fresh weights
    round_to: int = 8  # derived widths to the nearest multiple of this (benchmarks/student_speed.py chose 8; 1: the paper's rule exactly)
    # Where that multiple is the teacher's own width (a 16-wide layer the rule takes to 12): True
    # takes the multiple below (8), False keeps the exact width, which runs in the teacher's 16-wide
    # blocks and made the demo's student slower than its teacher in bf16 (benchmarks/student_speed.py).
    round_narrower: bool = True

    def validate(self, where: str) -> None:
        _check(self.source in ("derive", "named"), f"{where}.source", self.source, "must be 'derive' or 'named'")
        _check(self.round_to >= 1, f"{where}.round_to", self.round_to, "must be >= 1")
        if self.source == "named" and self.model is None:
            raise ConfigError(f"{where}.model: required when {where}.source is 'named' (e.g. model: {{arch: vgg11}})")


@dataclass(frozen=True)
class Arm:
    label: str  # how reports name it
    teacher: str | None  # who teaches the student: None (plain cross-entropy), unpruned, pruned, retrained


# The one table of arms: adding an arm is one entry here (plus, for a new kind of teacher, the
# stage that makes it in ptd.pipeline.run_pipeline).
ARM_TABLE = {
    "scratch": Arm("student alone (no teacher)", None),
    "unpruned_teacher": Arm("KD from unpruned teacher", "unpruned"),
    "pruned_teacher": Arm("KD from pruned teacher", "pruned"),
    # The control: the unpruned teacher trained on for as many epochs as pruning retrained the
    # pruned one, same schedule, no pruning. Without it a pruned teacher that teaches better may
    # just be a longer-trained teacher.
    "retrained_teacher": Arm("KD from unpruned teacher retrained as long (control)", "retrained"),
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
    # kd's defaults, kept here so existing configs mean the same: alpha weighs the soft (KL) term,
    # temperature is T. distill.options.kd overrides them.
    alpha: float = 0.95
    temperature: float = 10.0
    # {loss name: {option: value}}: validated by that loss's typed Options when it is built.
    options: dict = field(default_factory=dict)
    # {layer name a loss reads on the student: the student's own module name}; for a named student
    # whose modules are not named as the teacher's (derived students keep the names).
    layer_map: dict = field(default_factory=dict)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(epochs=200, lr=0.1, milestones=(60, 120, 160), gamma=0.2, weight_decay=5e-4))
    seeds: tuple[int, ...] = (0, 1)
    arms: tuple[str, ...] = DEFAULT_ARMS

    @property
    def losses(self) -> tuple[str, ...]:
        return (self.loss,) if isinstance(self.loss, str) else tuple(self.loss)

    def validate(self, where: str) -> None:
        # Loss names and options are checked by ptd.distill where the losses are built (and by
        # ptd.pipeline.check_plugins before a run starts): the config imports no plugin.
        _check(len(self.losses) >= 1 and len(set(self.losses)) == len(self.losses), f"{where}.loss", self.loss,
               "must be a loss name or a non-empty list of distinct names")
        for k, v in self.options.items():
            _check(isinstance(v, dict), f"{where}.options.{k}", v, "must be a mapping of that loss's options")
        for k, v in self.layer_map.items():
            _check(isinstance(k, str) and isinstance(v, str), f"{where}.layer_map", {k: v}, "must map layer names to module names")
        _check(0 <= self.alpha <= 1, f"{where}.alpha", self.alpha, "must be in [0, 1]")
        _check(self.temperature > 0, f"{where}.temperature", self.temperature, "must be > 0")
        _check(self.temperature <= MAX_TEMPERATURE, f"{where}.temperature", self.temperature,
               f"must be at most {MAX_TEMPERATURE:g}: beyond, float32 cannot resolve softmax(logits / T) and KD's loss is rounding noise")
        _check(len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds), f"{where}.seeds", list(self.seeds), "must be a non-empty list of distinct ints")
        for sd in self.seeds:
            _check(sd >= 0, f"{where}.seeds", sd, "each seed must be >= 0 (seeds key independent random streams)")
        _check(len(self.arms) >= 1, f"{where}.arms", list(self.arms), f"must list at least one arm of {', '.join(ARMS)}")
        for a in self.arms:
            _check(a in ARMS, f"{where}.arms", a, f"each arm must be one of {', '.join(ARMS)}")


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
        _check(self.seed >= 0, "seed", self.seed, "must be >= 0 (it is the root of every random stream)")
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


def _check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {value!r} {why}")


# ---------------------------------------------------------------- dict <-> dataclass


# A decimal number in exponent notation: what YAML 1.1 leaves a string when it has no dot (5e-4).
_FLOAT_LITERAL = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+")


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
            raise ConfigError(f"{key} ({source}): expected a mapping of {tp.__name__} keys, got {value!r}")
        return from_dict(tp, value, key, source)
    if origin is tuple:
        (elem, _) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} ({source}): expected a list, got {value!r}; write e.g. [1, 2]")
        return tuple(_coerce(elem, v, f"{key}[{i}]", source) for i, v in enumerate(value))
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} ({source}): expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} ({source}): expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} ({source}): expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_LITERAL.fullmatch(value.strip()):
            # PyYAML reads 5e-4 and 1e3 (no dot) as strings, unlike YAML 1.2 and every JSON or
            # Python user; the number they meant is taken.
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} ({source}): expected a number, got {value!r}")
        # No key means anything at nan or +-inf (YAML's .nan/.inf): such a value passes every range
        # check written as a comparison (inf > 0) or fails it with a confusing bound, and surfaces
        # mid-run as an overflow or a nan loss.
        if not math.isfinite(value):
            raise ConfigError(f"{key} ({source}): expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} ({source}): expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)}")


def from_dict(cls: type, data: dict, prefix: str = "", source: str = "config") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(f"{key} ({source}): unknown key; valid keys{' under ' + prefix if prefix else ''}: {', '.join(names)}")
        kwargs[k] = _coerce(hints[k], v, key, source)
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


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. --set distill.alpha=0.9")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Defaults, then the YAML file at ``path``, then ``overrides`` ("a.b=value")."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}; pass the path of a YAML file (see configs/)")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{p}{where}: not valid YAML ({getattr(e, 'problem', e)}); fix the syntax") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of config sections")
        data = loaded
        source = str(p)
        data.setdefault("name", p.stem)
    cfg = from_dict(RunConfig, data, "", source)
    over: dict = {}
    for text in overrides:
        keys, value = parse_override(text)
        d = over
        for k in keys[:-1]:
            d = d.setdefault(k, {})
        d[keys[-1]] = value
    if over:
        cfg = from_dict(RunConfig, _merge(to_dict(cfg), over), "", "command line")
    try:
        return cfg.validate()
    except ConfigError as e:
        where = source + (" + command line" if over else "")
        raise ConfigError(f"{e} (from {where})") from None


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
