"""Every config key, and every option of every registered loss and pruning strategy, given values
no run can use: the config and preflight either accept the value or refuse it with a one-line
``PtdError`` naming the key, before the run directory exists. Nothing else may come out: an
allocator's traceback, an ``OverflowError``, or OpenMP aborting the process for a thread count of
1e9 (which is what the first run of this check found, with nan and inf learning rates, widths and
temperatures accepted, and crop paddings, CRD sizes and image sizes that only failed mid-run).

Values that pass are not trained here; a nan loss from a finite but absurd value (lr 1e9) is
stopped by the training loop instead (tests/test_train.py, divergence tests).
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml
import torch

from ptd.config import ConfigError, RunConfig, load_config
from ptd.data import load_dataset
from ptd.distill import LOSSES
from ptd.errors import PtdError
from ptd.pipeline import check_plugins
from ptd.preflight import preflight
from ptd.pruning import STRATEGIES, strategy_options

from conftest import tiny_config, write_fashion_like

# As YAML text after "key=": non-finite, negative, zero, huge, and every wrong type.
HOSTILE = (".nan", ".inf", "-.inf", "-1", "0", "1000000000", "''", "null", "[]", "{}", "true", "abc")
F32_OUTSIDE = ("1e39", "-1e39", "1e-39")  # past float32's largest number, below its smallest normal one


def leaves(cls: type, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, type) of every leaf field of a config dataclass tree."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        sub = [a for a in (typing.get_args(tp) or (tp,)) if dataclasses.is_dataclass(a)]
        out += leaves(sub[0], f"{prefix}{f.name}.") if sub else [(prefix + f.name, tp)]
    return out


def plugin_cases() -> list[tuple[list[str], str]]:
    """(overrides selecting the plugin, the option's dotted key) for every option of every plugin."""
    cases = []
    for name in LOSSES.names():
        for f in dataclasses.fields(LOSSES.get(name).Options):
            cases.append(([f"distill.loss={name}"], f"distill.options.{name}.{f.name}"))
    for name in STRATEGIES.names():
        for f in dataclasses.fields(type(strategy_options(name, {}))):
            cases.append(([f"prune.strategy={name}"], f"prune.options.{f.name}"))
    return cases


def as_override(key: str, value: str) -> str:
    """``a.b.c=v`` for a config key; plugin options are nested mappings under their section."""
    if key.startswith("distill.options."):
        _, _, loss, opt = key.split(".", 3)
        return f"distill.options={{{loss}: {{{opt}: {value}}}}}"
    if key.startswith("prune.options."):
        return f"prune.options={{{key.split('.', 2)[2]}: {value}}}"
    return f"{key}={value}"


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    ws = tmp_path_factory.mktemp("hostile")
    data = write_fashion_like(ws / "fm", n_train=120, n_test=40)
    (ws / "c.yaml").write_text(yaml.safe_dump(tiny_config(data)))
    c = load_config(ws / "c.yaml")
    splits = load_dataset(c.data.name, c.data.root, val_fraction=c.data.val_fraction, seed=c.seed)
    return ws, splits


def check(ws: Path, splits, overrides: list[str], key: str) -> str:
    """Load and preflight; returns "ok" or the refusal's line. Any other outcome fails the test."""
    out = ws / "runs" / str(abs(hash(tuple(overrides))))
    try:
        cfg = load_config(ws / "c.yaml", overrides)
        preflight(cfg, out, splits=splits)
        check_plugins(cfg)
        return "ok"
    except PtdError as e:
        line = str(e)
        assert "\n" not in line and line, overrides
        assert not out.exists(), f"{overrides}: refused after writing {out}"
        return line
    # Anything else propagates: a traceback a user would see is this test's failure.


def test_the_trees_are_walked():
    keys = [k for k, _ in leaves(RunConfig)]
    assert {"teacher.optim.lr", "data.crop_padding", "threads", "sweep.student_from"} <= set(keys)
    plugin = [k for _, k in plugin_cases()]
    assert "distill.options.crd.nce_k" in plugin and "prune.options.rewind_epoch" in plugin
    assert len(keys) >= 50 and len(plugin) >= 40


def test_every_config_key_refuses_what_it_cannot_use_in_one_line(ws):
    root, splits = ws
    refused = {}
    for key, _ in leaves(RunConfig):
        for v in HOSTILE:
            line = check(root, splits, [as_override(key, v)], key)
            if line != "ok":
                refused[(key, v)] = line
    # Spot checks that the refusals name the key and the finite rule holds for every float key.
    floats = [k for k, tp in leaves(RunConfig) if tp is float or (typing.get_origin(tp) is not tuple and float in typing.get_args(tp))]
    lists = [k for k, tp in leaves(RunConfig) if typing.get_origin(tp) is tuple and float in typing.get_args(tp)]
    assert len(floats) >= 12 and "sweep.sparsities" in lists
    for k in floats:
        for v in (".nan", ".inf", "-.inf"):
            assert (k, v) in refused and k in refused[(k, v)] and "finite" in refused[(k, v)], (k, v, refused.get((k, v)))
    for k in lists:  # and inside lists of numbers
        line = check(root, splits, [as_override(k, "[.nan]")], k)
        assert k in line and "finite" in line, (k, line)
    # Past float32, which training computes in: 1e300 as a learning rate passed every check and
    # overflowed in the first optimizer step ("value cannot be converted to type float").
    for k, v in [(k, v) for k in floats for v in F32_OUTSIDE] + [(k, f"[{v}]") for k in lists for v in F32_OUTSIDE]:
        line = check(root, splits, [as_override(k, v)], k)
        assert k in line and "float32" in line, (k, v, line)


@pytest.mark.parametrize("select, key", plugin_cases(), ids=lambda x: x if isinstance(x, str) else "")
def test_every_plugin_option_refuses_what_it_cannot_use_in_one_line(ws, select, key):
    root, splits = ws
    opt = key.rsplit(".", 1)[1]
    named = opt.endswith("layer") or opt in ("negatives", "rewind", "layers", "teacher_layers", "student_layers")
    for v in HOSTILE + F32_OUTSIDE:
        line = check(root, splits, [*select, as_override(key, v)], key)
        if v in (".nan", ".inf", "-.inf", *F32_OUTSIDE) and line == "ok":
            # a non-finite or non-float32 value may only pass where the option is not a number at all (a name or a layer)
            assert named, (key, v)
        elif v in F32_OUTSIDE and not named:  # float32's range, or (an integer option) not an integer: the key named
            assert key in line, (key, v, line)


@pytest.mark.parametrize("text, value", [("lr: 5e-3", 0.005), ("lr: 1E2", 100.0), ("lr: 2.5e-1", 0.25), ("lr: .5e1", 5.0)])
def test_exponent_literals_are_numbers(tmp_path, text, value):
    """YAML 1.1 (PyYAML) reads 5e-3 as a string; ptd takes the number it means, in files and --set."""
    p = tmp_path / "c.yaml"
    p.write_text(f"teacher:\n  optim:\n    {text}\n")
    assert load_config(p).teacher.optim.lr == value
    assert load_config(None, [f"teacher.optim.{text.replace(': ', '=')}"]).teacher.optim.lr == value


def test_a_string_that_is_not_a_number_is_still_refused():
    with pytest.raises(ConfigError, match="teacher.optim.lr.*expected a number"):
        load_config(None, ["teacher.optim.lr=5e"])
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(None, ["teacher.optim.epochs=1e3"])  # integers stay integers


def test_preflight_is_the_same_whatever_ran_before(ws):
    """Preflight's stand-in teacher (whose magnitudes shape its stand-in student) once took the
    process's RNG state as it found it, so which masks the hostile-config test saw depended on the
    tests run before it; CI drew masks that the rounding bug turned into a 10**9-wide conv."""
    from ptd.preflight import check_model

    root, splits = ws
    cfg = load_config(root / "c.yaml")
    weights = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        before = torch.get_rng_state()
        m = check_model(cfg.teacher.model, "teacher.model", splits)
        assert torch.equal(torch.get_rng_state(), before)  # the run's RNG streams untouched
        weights.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    assert torch.equal(weights[0], weights[1])
