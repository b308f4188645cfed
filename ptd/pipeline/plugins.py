"""Every plugin name and option of a config, checked against the registries before any work
starts (the config module itself imports no plugin)."""
from __future__ import annotations

import dataclasses
from typing import Any

from ptd.config import ConfigError, ModelConfig, RunConfig
from ptd.models import build_model
from ptd.registry import OWN


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
                              f"or tv:<torchvision name>{OWN}")

    def strategy(where: str, name: str) -> None:
        if name not in STRATEGIES:
            raise ConfigError(f"{where}: unknown pruning strategy {name!r}{STRATEGIES.meant(name)}; valid: {', '.join(STRATEGIES.names())}{OWN}")

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
            raise ConfigError(f"distill.loss: unknown distillation loss {name!r}{LOSSES.meant(name)}; valid: {', '.join(LOSSES.names())}{OWN}")
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
        # The option that holds the layer, and whether the config set it: distill.loss=[kd, at] on a VGG
        # was refused for at's default 'layer1' (ptd's ResNet stage names), a layer the user never wrote,
        # with no key named to set (new-user trial).
        key = next((f.name for f in dataclasses.fields(opts[loss]) if f.name.startswith(side) and "layer" in f.name
                    and layer in (lambda v: v if isinstance(v, (tuple, list)) else (v,))(getattr(opts[loss], f.name))), None)
        given = cfg.distill.options.get(loss) or {}
        where = f"distill.options.{loss}" + (f".{key}" if key else "")
        default = f" (its default: the config does not set {where})" if key and key not in given else ""
        raise ConfigError(f"{where}: layer {layer!r}{default} is not a module of the {side} ({hint}; or {PENULTIMATE}); "
                          f"{'set it to' if key else 'name'} one of its modules"
                          + (", or map it with distill.layer_map" if side == "student" else ""))

    t_names = names_of(cfg.teacher.model)
    s_names = names_of(cfg.student.model) if cfg.student.source == "named" else t_names
    for loss, (t_layers, s_layers) in wanted.items():
        for layer in t_layers:
            check("teacher", loss, layer, t_names)
        for layer in s_layers:
            check("student", loss, cfg.distill.layer_map.get(layer, layer), s_names)
