"""Configs and flags that no run can use are refused at load, in one line naming the key: integers
past what their consumers take (seeds, epochs, iterations), conflicting --set keys, YAML that is not
a config (duplicate keys, deep nesting, alias bombs, an empty file), empty flag values, run names
that are paths, and plugin options that would be ignored or only fail after the teacher trained.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ptd.cli import main
from ptd.config import MAX_EPOCHS, ConfigError, check_sweep, load_config
from ptd.errors import MAX_LINE, one_line
from ptd.seeding import MAX_SEED, stream_seed

from conftest import tiny_config, write_fashion_like


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("badcfg")
    data = write_fashion_like(ws / "fm", n_train=120, n_test=40)
    (ws / "c.yaml").write_text(yaml.safe_dump(tiny_config(data)))
    from ptd.models import build_model
    from ptd.train.checkpoint import save_model

    c = load_config(ws / "c.yaml")
    save_model(ws / "teacher.safetensors", build_model(c.teacher.model.arch, 10, 1, **c.teacher.model.kwargs))
    return ws


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
            for p in sorted(root.rglob("*"))}


def refused(ws: Path, argv: list[str], capsys, monkeypatch) -> str:
    """main(argv) run in ``ws``: exit 2, exactly one stderr line, no traceback, nothing in ``ws``
    created or changed. Returns the line."""
    monkeypatch.chdir(ws)
    before = _digest(ws)
    capsys.readouterr()
    rc = main([a.replace("{ws}", str(ws)) for a in argv])
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2 and "Traceback" not in err, (rc, err)
    assert len(lines) == 1 and lines[0].startswith("ptd: error: "), err
    assert _digest(ws) == before, sorted(set(_digest(ws)) ^ set(before)) or "a file changed"
    return lines[0]


def config_error(text: str, tmp_path: Path, overrides: list[str] = ()) -> str:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p, list(overrides))
    msg = str(e.value)
    assert "\n" not in msg and len(msg) <= MAX_LINE
    return msg


# ----------------------------------------------------------------------------- --set overrides


@pytest.mark.parametrize("sets, words", [
    (["teacher.optim.lr=1", "teacher.optim.lr.x=2"], ["'teacher.optim.lr=1'", "'teacher.optim.lr.x=2'", "conflict"]),
    (["teacher=1", "teacher.optim.lr=2"], ["'teacher=1'", "'teacher.optim.lr=2'", "conflict"]),
    (["prune.options.seed=3", "prune.options={seed: 1}"], ["'prune.options.seed=3'", "'prune.options={seed: 1}'"]),
])
def test_conflicting_set_keys_name_both(ws, capsys, monkeypatch, sets, words):
    argv = ["train", "{ws}/c.yaml", "--out", "{ws}/out"]
    for s in sets:
        argv += ["--set", s]
    line = refused(ws, argv, capsys, monkeypatch)
    for w in words:
        assert w in line, (w, line)


def test_a_repeated_set_key_takes_the_last_value():
    assert load_config(None, ["seed=1", "seed=2"]).seed == 2


@pytest.mark.parametrize("sets, words", [
    ([""], ["override ''", "KEY=VALUE"]),
    (["=x"], ["'=x'", "no key"]),
    (["teacher..optim.lr=1"], ["'teacher..optim.lr'", "empty part"]),
    (["seed="], ["seed", "no value"]),
    (["teacher.optim.lr="], ["teacher.optim.lr", "no value"]),
    # optional keys too: null would mean "unset", and `data.root=` trained silently on the default data
    (["data.root="], ["'data.root='", "no value after '='", "data.root=null to unset"]),
    (["teacher.checkpoint= "], ["teacher.checkpoint", "no value after '='"]),
    # past Python's 4,300-digit limit PyYAML's int constructor raised a bare ValueError: "internal error"
    (["teacher.optim.epochs=" + "9" * 5000], ["override 'teacher.optim.epochs=99999", "...'", "more than 4,300 digits", "smaller number"]),
])
def test_empty_set_parts_are_one_line(ws, capsys, monkeypatch, sets, words):
    argv = ["prune", "{ws}/c.yaml", "--out", "{ws}/out"] + [x for s in sets for x in ("--set", s)]
    line = refused(ws, argv, capsys, monkeypatch)
    for w in words:
        assert w in line, (w, line)
    assert len(line) < 400  # a 5,000-digit value is quoted cut


def test_a_config_file_with_a_5000_digit_integer_is_one_line(ws, capsys, monkeypatch):
    (ws / "huge.yaml").write_text("seed: " + "9" * 5000 + "\n")
    line = refused(ws, ["prune", "{ws}/huge.yaml", "--out", "{ws}/out"], capsys, monkeypatch)
    assert "huge.yaml: the YAML holds an integer of more than 4,300 digits" in line and len(line) < 400


@pytest.mark.parametrize("argv, words", [
    (["train", "{ws}/c.yaml", "--teacher", "", "--out", "{ws}/out"], ["--teacher", "empty", "leave --teacher out"]),
    (["distill", "{ws}/c.yaml", "--teacher", "  ", "--out", "{ws}/out"], ["--teacher", "empty"]),
    (["run", "{ws}/c.yaml", "--device", "", "--out", "{ws}/out"], ["--device", "empty", "auto, cpu"]),
    (["eval", "{ws}/teacher.safetensors", "{ws}/c.yaml", "--device", ""], ["--device", "empty"]),
])
def test_empty_flag_values_are_refused(ws, capsys, monkeypatch, argv, words):
    line = refused(ws, argv, capsys, monkeypatch)
    for w in words:
        assert w in line, (w, line)


# ----------------------------------------------------------------------------- integer ranges


def test_max_seed_is_taken_by_every_consumer():
    """The one seed bound: stream_seed, torch's generators, numpy's legacy seeding and CRD's
    negatives seed (seed * 1_000_003 + step) all take MAX_SEED."""
    stream_seed(MAX_SEED, "student", MAX_SEED)
    torch.Generator().manual_seed(MAX_SEED)
    torch.Generator().manual_seed(MAX_SEED * 1_000_003 + 10**12)
    np.random.RandomState(MAX_SEED)
    with pytest.raises(ValueError):
        np.random.RandomState(MAX_SEED + 1)  # why the bound is not 2**64 - 1
    cfg = load_config(None, [f"seed={MAX_SEED}", f"distill.seeds=[0, {MAX_SEED}]"])
    assert cfg.seed == MAX_SEED and cfg.distill.seeds == (0, MAX_SEED)


@pytest.mark.parametrize("sets, words", [
    ([f"seed={MAX_SEED + 1}"], ["seed", str(MAX_SEED)]),
    ([f"seed={2**64}"], ["seed", str(2**64)]),  # past any integer torch holds: refused before the seed check
    ([f"distill.seeds=[0, {MAX_SEED + 1}]"], ["distill.seeds", str(MAX_SEED)]),
    ([f"distill.seeds=[{2**64}]"], ["distill.seeds[0]", str(2**64)]),
    ([f"teacher.optim.epochs={MAX_EPOCHS + 1}"], ["teacher.optim.epochs", "at most 100,000"]),
    ([f"distill.optim.milestones=[2, {MAX_EPOCHS + 1}]"], ["distill.optim.milestones", "100,000"]),
    (["prune.retrain.epochs=100000000000000000000"], ["prune.retrain.epochs", "largest integer"]),
    (["teacher.seeds=1001"], ["teacher.seeds", "at most 1,000"]),
    ([f"data.train_subset={2**63}"], ["data.train_subset", "largest integer"]),
    (["threads=0"], ["threads", ">= 1"]),
    (["data.image_size=0"], ["data.image_size", ">= 1"]),
    (["student.round_to=1000000000"], ["student.round_to", "at most 1024"]),
    (["student.round_to=fast"], ["student.round_to", "'fast'", "or auto"]),
])
def test_integers_are_range_checked_at_load(ws, capsys, monkeypatch, sets, words):
    argv = ["train", "{ws}/c.yaml", "--out", "{ws}/out"] + [x for s in sets for x in ("--set", s)]
    line = refused(ws, argv, capsys, monkeypatch)
    for w in words:
        assert w in line, (w, line)


def test_integers_from_a_file_name_the_file(tmp_path):
    msg = config_error("seed: 100000000000000000000000000000\n", tmp_path)
    assert "seed" in msg and "c.yaml" in msg


@pytest.mark.parametrize("sets, words", [
    (["prune.strategy=random", f"prune.options={{seed: {MAX_SEED + 1}}}"], ["prune.options.seed", str(MAX_SEED)]),
    (["prune.strategy=random", f"prune.options={{seed: {2**64}}}"], ["prune.options.seed"]),
    (["prune.strategy=synflow", "prune.options={iterations: 1000000000}"], ["prune.options.iterations", "at most 10,000"]),
    (["prune.strategy=snip", "prune.options={batches: 10001}"], ["prune.options.batches", "10,000"]),
    (["prune.strategy=gmp", f"prune.options={{start_epoch: {MAX_EPOCHS}}}"], ["prune.options.start_epoch"]),
    (["distill.loss=crd", f"distill.options={{crd: {{seed: {MAX_SEED + 1}}}}}"], ["distill.options.crd", "seed", str(MAX_SEED)]),
    (["distill.loss=crd", f"distill.options={{crd: {{seed: {2**64}}}}}"], ["distill.options.crd.seed"]),
    (["distill.loss=dkd", f"distill.options={{dkd: {{warmup_epochs: {MAX_EPOCHS + 1}}}}}"], ["distill.options.dkd", "warmup_epochs"]),
])
def test_plugin_integer_options_are_range_checked(ws, sets, words):
    """check_plugins runs before the run directory is written (the next test runs one through the CLI)."""
    from ptd.pipeline import check_plugins

    with pytest.raises(ConfigError) as e:
        check_plugins(load_config(ws / "c.yaml", sets))
    msg = str(e.value)
    assert "\n" not in msg and "Overflow" not in msg
    for w in words:
        assert w in msg, (w, msg)


@pytest.mark.slow
def test_a_plugin_seed_out_of_range_stops_before_the_teacher_trains(ws, capsys, monkeypatch):
    line = refused(ws, ["prune", "{ws}/c.yaml", "--set", "prune.strategy=random", "--set", f"prune.options={{seed: {2**64}}}",
                        "--out", "{ws}/out"], capsys, monkeypatch)
    assert "prune.options.seed" in line and not (ws / "out").exists()


def test_gmp_window_is_checked_against_the_retraining():
    from ptd.pruning import strategy_options
    from ptd.pruning.strategies.gmp import check_window

    assert check_window(strategy_options("gmp", {}), 10) == (0, 6)
    assert check_window(strategy_options("gmp", {"start_epoch": 2, "end_epoch": 10}), 10) == (2, 10)
    for opts in ({"start_epoch": 5, "end_epoch": 2}, {"start_epoch": 50}, {"end_epoch": 11}):
        with pytest.raises(ConfigError, match=r"prune\.options\.end_epoch: .* <= prune\.retrain\.epochs \(10\)"):
            check_window(strategy_options("gmp", opts), 10)


# ----------------------------------------------------------------------------- YAML that is not a config


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "---\n", "~\n", "null\n", "{}\n"])
def test_an_empty_config_file_is_refused(tmp_path, text):
    msg = config_error(text, tmp_path)
    assert "empty config" in msg and "configs/fashion_mnist_demo.yaml" in msg and "c.yaml" in msg


def test_no_config_at_all_still_means_the_defaults():
    assert load_config().teacher.model.arch == "vgg11"  # ptd eval CHECKPOINT without a config


@pytest.mark.parametrize("text, words", [
    ("seed: 1\nname: x\nseed: 2\n", ["line 3", "'seed'", "twice", "line 1"]),
    ("teacher:\n  optim:\n    lr: 0.1\n    lr: 0.2\n", ["line 4", "'lr'", "line 3"]),
    ("teacher:\n  seeds: 1\nprune: {rate: 0.2}\nteacher:\n  seeds: 2\n", ["line 4", "'teacher'", "line 1"]),
    ("distill: {options: {kd: {alpha: 0.5, alpha: 0.6}}}\n", ["'alpha'", "twice"]),
])
def test_duplicate_keys_are_refused_with_their_lines(tmp_path, text, words):
    msg = config_error(text, tmp_path)
    for w in words:
        assert w in msg, (w, msg)


def test_merge_keys_may_be_overridden(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("teacher:\n  optim: &o {epochs: 3, lr: 0.5}\ndistill:\n  optim:\n    <<: *o\n    lr: 0.2\n")
    cfg = load_config(p)
    assert cfg.distill.optim.epochs == 3 and cfg.distill.optim.lr == 0.2


@pytest.mark.parametrize("text", [
    "seed: " + "[" * 600 + "]" * 600 + "\n",  # PyYAML alone: RecursionError
    "".join("  " * i + f"k{i}:\n" for i in range(600)) + "  " * 600 + "v: 1\n",
])
def test_deep_nesting_is_refused_without_recursion(tmp_path, text):
    msg = config_error(text, tmp_path)
    assert "nested more than 50 levels" in msg and "line" in msg


def test_deep_nesting_in_a_set_value(ws, capsys, monkeypatch):
    line = refused(ws, ["train", "{ws}/c.yaml", "--set", "teacher.model.kwargs={plan: " + "[" * 600 + "]" * 600 + "}"],
                   capsys, monkeypatch)
    assert "nested more than 50 levels" in line and "teacher.model.kwargs" in line


def _bomb(levels: int) -> str:
    lines = ["teacher:", "  model:", "    kwargs:", "      bogus:", "      - &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"      - &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_before_it_expands(tmp_path):
    start = time.perf_counter()
    msg = config_error(_bomb(30), tmp_path)  # 10^30 values once expanded
    assert "10,000 values" in msg and "aliases" in msg
    assert time.perf_counter() - start < 5


def test_a_chain_of_aliases_is_measured_without_recursion(tmp_path):
    text = "a0: &a0 [1]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}]\n" for i in range(1, 1200))
    msg = config_error(text, tmp_path)
    assert "nested more than 50 levels" in msg


def test_a_recursive_alias_is_refused(tmp_path):
    msg = config_error("teacher:\n  model:\n    kwargs: &k {plan: *k}\n", tmp_path)
    assert "alias" in msg


def test_aliases_within_bounds_still_work(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("teacher:\n  optim: &o {epochs: 3, batch_size: 16, lr: 0.5}\nprune:\n  retrain: *o\n")
    assert load_config(p).prune.retrain.lr == 0.5


def test_one_line_is_capped():
    text = "head " + "x" * 1_000_000 + " the fix"
    line = one_line(text)
    assert len(line) <= MAX_LINE and line.startswith("head ") and line.endswith(" the fix")
    assert "1,000,013 characters" in line
    assert one_line("short\nmessage") == "short message"


# ----------------------------------------------------------------------------- the run name


@pytest.mark.parametrize("name, why", [
    ("/tmp/escaped", "path separator"), ("../../escaped", "path separator"), ("a\\b", "path separator"),
    ("..", "'..'"), (".", "'.'"), ("", "empty"), ("a\nb", "control character"), ("x" * 300, "255 bytes"),
])
def test_the_run_name_is_a_plain_folder_name(ws, tmp_path, capsys, monkeypatch, name, why):
    p = ws / f"name_{abs(hash(name))}.yaml"
    p.write_text(yaml.safe_dump({**yaml.safe_load((ws / "c.yaml").read_text()), "name": name}))
    try:
        line = refused(ws, ["train", str(p)], capsys, monkeypatch)
    finally:
        p.unlink()
    assert "name:" in line and why in line and "--out" in line, line
    assert not (ws / "runs").exists()


# ----------------------------------------------------------------------------- distill arms, layer_map, sweep


def test_duplicate_arms_are_refused(ws, capsys, monkeypatch):
    line = refused(ws, ["run", "{ws}/c.yaml", "--set", "distill.arms=[scratch, scratch]", "--out", "{ws}/out"], capsys, monkeypatch)
    assert "distill.arms" in line and "once" in line


def test_layer_map_must_name_a_layer_a_loss_reads():
    from ptd.distill import loss_options
    from ptd.distill.distiller import check_layer_map

    kd = {"kd": loss_options("kd")}
    at = {"at": loss_options("at", {"teacher_layers": ["features.0"]})}
    check_layer_map({}, kd)
    check_layer_map({"features.0": "body.0"}, at)
    with pytest.raises(ConfigError, match=r"^distill.layer_map: .* reads only logits"):
        check_layer_map({"nonexistent": "alsono"}, kd)
    with pytest.raises(ConfigError, match=r"^distill.layer_map.nonexistent: no loss reads .*features.0"):
        check_layer_map({"nonexistent": "alsono"}, at)
    with pytest.raises(ConfigError, match="distill.layer_map"):
        load_config(None, ["distill.layer_map={'': x}"])


def test_a_sweep_refuses_the_control_arm():
    check_sweep(load_config())
    with pytest.raises(ConfigError, match=r"^distill.arms: .*retrained_teacher.*no control arm.*distill.arms=\[scratch, pruned_teacher\]"):
        check_sweep(load_config(None, ["distill.arms=[scratch, retrained_teacher, pruned_teacher]"]))


def test_ptd_sweep_refuses_the_control_arm_before_any_work(ws, capsys, monkeypatch):
    """check_sweep existed but ptd sweep never called it: the arm was dropped without a word."""
    argv = ["sweep", "{ws}/c.yaml", "--out", "{ws}/out", "--set", "distill.arms=[scratch, retrained_teacher, pruned_teacher]"]
    line = refused(ws, argv, capsys, monkeypatch)
    assert "retrained_teacher" in line and "no control arm" in line


# ----------------------------------------------------------------------------- ptd eval checks what run checks


@pytest.mark.parametrize("sets, words", [
    (["threads=0"], ["threads", ">= 1"]),
    (["threads=100000"], ["threads", "CPUs"]),
    (["data.workers=-1"], ["data.workers"]),
    ([f"seed={2**64}"], ["seed"]),
    (["name=../x"], ["name"]),
])
def test_eval_checks_the_config_as_run_does(ws, capsys, monkeypatch, sets, words):
    argv = ["eval", "{ws}/teacher.safetensors", "{ws}/c.yaml"] + [x for s in sets for x in ("--set", s)]
    line = refused(ws, argv, capsys, monkeypatch)
    for w in words:
        assert w in line, (w, line)


@pytest.mark.parametrize("over, words", [
    ("teacher.seeds=[0, 1]", ["expected an integer, got [0, 1]", "number of teacher replicates", "distill.seeds lists seeds"]),
    ("distill.seeds=5", ["expected a list, got 5", "distill.seeds is the list of student seeds"]),
])
def test_the_two_seeds_keys_say_what_they_mean_when_confused(over, words):
    """teacher.seeds counts teacher replicates, distill.seeds lists student seeds: a value of the
    other's shape is refused with the meaning of the key given, in the one line."""
    from ptd.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config(None, [over])
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


@pytest.mark.parametrize("overrides, named", [
    (["student.model={arch: vgg8}"], "student.model: given, but student.source is 'derive'"),
    (["student.source=named", "student.model={arch: vgg8}", "student.inherit=true"], "student.inherit: true, but student.source is 'named'"),
])
def test_a_student_key_its_source_never_reads_is_refused(overrides, named):
    """Both were accepted and silently ignored: the run trained another student than the config described."""
    from ptd.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert named in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------- the plan's total


def _seeds(n: int) -> str:
    return "distill.seeds=[" + ",".join(map(str, range(n))) + "]"


@pytest.mark.parametrize("command, sets, words", [
    # 5,000 seeds x 3 students each (the tiny config's arms) x 200 epochs: every key within its own
    # bound, their product 3,000,000 epochs, accepted and started before.
    ("run", [_seeds(5000), "distill.optim.epochs=200"], ["3,000,0", "students: 15,000 runs of 200 epochs", "distill.seeds (5,000 listed)"]),
    ("distill", [_seeds(5000), "distill.optim.epochs=200"], ["students: 15,000 runs"]),
    ("sweep", [_seeds(5000), "distill.optim.epochs=100", "distill.arms=[scratch, pruned_teacher]", "sweep.sparsities=[0.2, 0.36]"],
     ["students: 15,000 runs of 100 epochs", "sweep.sparsities or sweep.strategies"]),
    # 1,000 replicates of a 2,000-epoch teacher: each bound held (MAX_REPLICATES, MAX_EPOCHS).
    ("run", ["teacher.seeds=1000", "teacher.optim.epochs=2000", "distill.optim.epochs=1"], ["most of them are teacher", "teacher.seeds"]),
])
def test_a_plan_past_a_million_epochs_is_refused_before_any_work(ws, capsys, monkeypatch, command, sets, words):
    argv = [command, "{ws}/c.yaml", "--out", "{ws}/out"] + [x for s in sets for x in ("--set", s)]
    line = refused(ws, argv, capsys, monkeypatch)
    assert "more than 1,000,000" in line and all(w in line for w in words), line


def test_the_plan_refusal_counts_what_the_plan_line_shows_and_its_bound_is_inclusive():
    """plan_line's total and the refusal's are one count (planned_epochs): a plan of exactly
    MAX_PLANNED_EPOCHS passes, one more student does not."""
    from ptd.pipeline import plan_line
    from ptd.preflight import MAX_PLANNED_EPOCHS, check_planned_epochs, planned_epochs

    c = load_config("configs/fashion_mnist_demo.yaml", ["teacher.seeds=2", "distill.loss=[kd,dkd]"])
    plan = planned_epochs(c)
    assert plan == {"teacher": (2, 8), "pruning": (8, 2), "control": (8, 2), "students": (28, 4)}
    assert plan_line(c, "report", c.distill.arms).endswith(": 160 epochs of training in all (a student's epoch is cheaper: a smaller net)")
    # teacher 8 + pruning 8 + control 8 epochs; 8 students a seed (4 arms, teacher arms x 1 loss).
    base = ["distill.optim.epochs=1000"]
    fits = (MAX_PLANNED_EPOCHS - 24) // 4000  # seeds whose students fit beside the teachers
    c = load_config("configs/fashion_mnist_demo.yaml", base + [_seeds(fits)])
    check_planned_epochs(c)
    rest = MAX_PLANNED_EPOCHS - 24 - fits * 4000
    c = load_config("configs/fashion_mnist_demo.yaml", [f"distill.optim.epochs={1000}", _seeds(fits), f"teacher.optim.epochs={8 + rest}"])
    assert sum(n * e for n, e in planned_epochs(c).values()) == MAX_PLANNED_EPOCHS
    check_planned_epochs(c)
    c = load_config("configs/fashion_mnist_demo.yaml", [f"distill.optim.epochs={1000}", _seeds(fits), f"teacher.optim.epochs={9 + rest}"])
    with pytest.raises(ConfigError, match=r"^the plan trains 1,000,001 epochs in all"):
        check_planned_epochs(c)


def test_a_sweep_says_what_it_will_train_before_it_starts():
    """ptd run had its [plan] line; a sweep started with the teacher's bar alone. The shipped sweep
    (0.36, 0.59, 0.79 by imp, gmp, oneshot): one IMP run to 0.79 gives every level (7 rounds), gmp
    and oneshot retrain once per sparsity (3 + 3): 13 retrainings of 2 epochs."""
    from ptd.preflight import planned_epochs
    from ptd.sweep import sweep_plan_line

    c = load_config("configs/fashion_mnist_sweep.yaml")
    plan = planned_epochs(c, sweep=True)
    assert plan["pruning"] == (7 + 3 + 3, 2)
    total = sum(n * e for n, e in plan.values())
    line = sweep_plan_line(c)
    assert line.startswith(f"[plan] teacher {c.teacher.optim.epochs} epochs; pruning {plan['pruning'][0]} rounds")
    assert f"up to {total} epochs of training in all" in line
    n_keys = sum(a in c.distill.arms for a in ("scratch", "unpruned_teacher")) + len(c.sweep.strategies) * len(c.sweep.sparsities)
    assert plan["students"] == (n_keys * len(c.distill.seeds), c.distill.optim.epochs)


@pytest.mark.parametrize("setting, line", [
    ("distill.arms=scratch", "distill.arms (command line): expected a list, got 'scratch'; write e.g. [scratch]"),
    ("sweep.strategies=gmp", "sweep.strategies (command line): expected a list, got 'gmp'; write e.g. [gmp]"),
    ("teacher.optim.milestones=null", "teacher.optim.milestones (command line): expected a list, got no value (null); "
                                      "write e.g. [1, 2]"),
    ("teacher.optim.milestones=3", "teacher.optim.milestones (command line): expected a list, got 3; write e.g. [1, 2]"),
])
def test_a_list_key_given_one_value_shows_a_list_of_its_own_kind(setting: str, line: str):
    """distill.arms=scratch was told "write e.g. [1, 2]", numbers for a list of arm names, and
    milestones=null "write one after the key; write e.g. [1, 2]" (new-user trial)."""
    with pytest.raises(ConfigError) as e:
        load_config(None, [setting])
    assert str(e.value) == line
