"""End to end: the whole pipeline on a tiny dataset written in idx format, resume after a kill,
and the command line's answers to bad input."""
import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_config
from ptd.cli import main
from ptd.config import load_config
from ptd.pipeline import run_pipeline

PTD = [sys.executable, "-m", "ptd"]


def run_cli(*args, cwd=None):
    return subprocess.run([*PTD, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.slow
def test_whole_pipeline_end_to_end(tmp_path, tiny_fashion, capsys, monkeypatch):
    tiny_yaml = tmp_path / "tiny.yaml"
    cfg = tiny_config(tiny_fashion)
    cfg["distill"]["arms"] = ["scratch", "unpruned_teacher", "pruned_teacher", "retrained_teacher"]
    tiny_yaml.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    import ptd.pipeline.context

    kept: dict[str, str] = {}  # each training stage's description -> the weights it ends with

    def spy(*a, keep="best", desc="", **kw):
        kept[desc] = keep
        return fit(*a, keep=keep, desc=desc, **kw)

    fit = ptd.pipeline.context.fit  # Context.fit's own name for it (the package re-exports no fit)
    monkeypatch.setattr(ptd.pipeline.context, "fit", spy)
    assert main(["run", str(tiny_yaml), "--out", str(out), "--quiet"]) == 0
    # The published code's choices: the teacher and the students end on their best-validation
    # weights, every retraining round (and the control's, the same training unpruned) on its last.
    assert {d: k for d, k in kept.items() if k == "last"} == {d: "last" for d in ("prune level_1", "prune level_2", "control 1", "control 2")}
    assert kept["teacher"] == "best" and all(kept[d] == "best" for d in kept if d.endswith(("s0", "s1")))
    printed = capsys.readouterr().out
    assert "distilled from pruned teacher" in printed  # the CLI prints the report

    for f in ["config.yaml", "env.json", "teacher/model.safetensors", "teacher/metrics.jsonl", "teacher/done",
              "prune/level_1/masks.safetensors", "prune/level_2/model.safetensors", "prune/level_2/sparsity.json", "prune/done",
              "student/architecture.json", "student/stats.json", "distill/pruned_teacher_seed1/model.safetensors",
              "results.json", "report.md"]:
        assert (out / f).is_file(), f
    r = json.loads((out / "results.json").read_text())
    assert 0.5 < r["teacher"]["test_acc"] <= 1.0  # 10 classes: chance is 0.1
    pt = r["pruned_teacher"]
    assert pt["sparsity"] == pytest.approx(0.36, abs=0.002)  # 2 rounds of 20%
    assert 0.0 <= pt["test_acc"] <= 1.0 and pt["params_nonzero"] < r["teacher"]["params"]
    studs = r["students"]
    assert sorted((s["arm"], s["seed"]) for s in studs) == sorted(
        (a, s) for a in ("scratch", "unpruned_teacher", "pruned_teacher", "retrained_teacher") for s in (0, 1))
    # the control teacher trained exactly as many epochs as pruning retrained, in as many rounds
    assert r["retrained_teacher"]["epochs"] == r["compute"]["pruning"]["epochs"] == 2
    assert (out / "control" / "round_2" / "done").is_file()
    assert "pruned_minus_retrained" in r["comparison"]
    for s in studs:
        assert 0.0 <= s["test_acc"] <= 1.0
        assert s["params"] < r["teacher"]["params"] and s["flops"] < r["teacher"]["flops"]
    assert set(r["summary"]) == {"scratch", "unpruned_teacher", "pruned_teacher", "retrained_teacher"}
    assert r["summary"]["pruned_teacher"]["n"] == 2
    assert "pruned_minus_unpruned" in r["comparison"]
    env = json.loads((out / "env.json").read_text())
    assert env["made_by"] == "run"  # preflight.run_kind reads it
    # The images each split held and the precision, which no report said (new-user audit).
    from ptd.config import load_config
    from ptd.data import load_configured

    sp = load_configured(load_config(str(tiny_yaml)).data, 0)
    assert r["setup"] == {"images": {"train": len(sp.train), "val": len(sp.val), "test": len(sp.test)}, "device": "cpu",
                          "amp_bf16": env["amp_bf16"]}
    from ptd.train.checkpoint import load_model  # every model file records its inputs' normalisation (real-data audit)

    for f in ("teacher/model.safetensors", "distill/pruned_teacher_seed0/model.safetensors"):
        assert load_model(out / f).ptd_normalize == {"mean": [float(v) for v in sp.mean], "std": [float(v) for v in sp.std]}, f
    assert (f"Images: {len(sp.train):,} training, {len(sp.val):,} validation, {len(sp.test):,} test. Trained in "
            f"{'bf16 autocast (fp32 weights)' if env['amp_bf16'] else 'fp32'} on cpu") in (out / "report.md").read_text()
    assert env["torch"] == torch.__version__ and env["seeds"]["students"] == [0, 1]
    md = (out / "report.md").read_text()
    assert "| distilled from pruned teacher |" in md
    # Each verdict that calls nothing says what its 2 seeds could have found (or, every seed tied, that they are too few).
    for c in r["comparison"].values():
        if not c["called"]:
            # (past 100 points no accuracy difference can reach: said as that, test_report)
            assert ("at 2 seeds and this spread, a real difference is called 4 times in 5 only from about" in c["verdict"]
                    or "at 2 seeds and this spread, no real difference is called 4 times in 5" in c["verdict"]
                    or "too few seeds" in c["verdict"]), c["verdict"]
            assert c["verdict"] in md
    # The deployed latency the student stage measured reaches results.json, report.md and report.html.
    ort = r["student"]["onnx_latency"]
    assert ort == json.loads((out / "student" / "stats.json").read_text())["onnx_latency"]
    for b in ("1", "64"):
        v = ort[f"batch_{b}"]
        # 20 paired rounds asked (tiny nets finish them under the cap): an interval from more than
        # the lowest and highest ratio, which at 5-6 rounds left most rows untold.
        assert len(v["teacher_times_ms"]) == len(v["student_times_ms"]) == 20 and v["confidence"] > 0.95
        assert f"| onnxruntime ({ort['threads']} thread" in md and f"| {b} | {v['teacher_ms']:.2f} | {v['student_ms']:.2f} | {v['speedup']:.2f}x |" in md
        assert f"<td>{v['teacher_ms']:.2f}</td><td>{v['student_ms']:.2f}</td>" in (out / "report.html").read_text()

    # A second run of the same command does nothing again and gives the same results.
    mtime = (out / "teacher" / "model.safetensors").stat().st_mtime_ns
    assert main(["run", str(tiny_yaml), "--out", str(out), "--quiet"]) == 0
    assert (out / "teacher" / "model.safetensors").stat().st_mtime_ns == mtime
    assert json.loads((out / "results.json").read_text())["students"] == studs


@pytest.mark.slow
def test_kill_and_resume(tmp_path, tiny_fashion):
    cfg = tiny_config(tiny_fashion, distill={"seeds": [0], "arms": ["pruned_teacher"], "optim": {"epochs": 12, "batch_size": 64, "lr": 0.05}})
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    proc = subprocess.Popen([*PTD, "run", str(p), "--out", str(out), "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = out / "distill" / "pruned_teacher_seed0" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.2)
    assert metrics.is_file(), proc.stderr.read().decode() if proc.poll() is not None else "no distill epoch in time"
    os.kill(proc.pid, signal.SIGKILL)  # no chance to clean up: the hardest kind of stop
    proc.wait()
    done_before = len(metrics.read_text().splitlines())
    assert not (out / "results.json").exists()
    teacher_mtime = (out / "teacher" / "model.safetensors").stat().st_mtime_ns
    prune_mtime = (out / "prune" / "level_2" / "model.safetensors").stat().st_mtime_ns

    r = run_cli("run", p, "--out", out, "--quiet")  # the same command again
    assert r.returncode == 0, r.stderr
    epochs = [json.loads(l)["epoch"] for l in metrics.read_text().splitlines()]
    assert epochs == list(range(1, 13))  # every epoch once: resumed, not restarted
    assert done_before >= 2
    assert (out / "teacher" / "model.safetensors").stat().st_mtime_ns == teacher_mtime  # not retrained
    assert (out / "prune" / "level_2" / "model.safetensors").stat().st_mtime_ns == prune_mtime
    env = json.loads((out / "env.json").read_text())
    assert len(env["resumed"]) == 1


def test_user_teacher_checkpoint(tmp_path, tiny_fashion):
    cfg = tiny_config(tiny_fashion)
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    c = load_config(p, ["quiet=true"])
    t = run_pipeline(c, tmp_path / "a", until="teacher")
    from ptd.train.checkpoint import read_state_dict

    torch.save(read_state_dict(tmp_path / "a" / "teacher" / "model.safetensors"), tmp_path / "mine.pt")
    r = run_cli("train", p, "--out", tmp_path / "b", "--teacher", tmp_path / "mine.pt", "--quiet")
    assert r.returncode == 0, r.stderr
    got = json.loads((tmp_path / "b" / "teacher" / "result.json").read_text())
    assert got["epochs"] == 0 and got["test_acc"] == pytest.approx(t["test_acc"])


def one_line_error(r):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("ptd: error:"), r.stderr
    return lines[0]


@pytest.mark.parametrize("over, words", [
    (["--set", "distill.alpah=0.5"], ["distill.alpah", "alpha"]),
    (["--set", "distill.alpha=big"], ["distill.alpha", "number"]),
    (["--set", "prune.target_sparsity=1.0"], ["prune.target_sparsity", "[0, 1)"]),
    (["--set", "prune.strategy=nope"], ["nope", "imp"]),
    (["--set", "data.root=/nonexistent/fm"], ["/nonexistent/fm", "apt-get install dataset-fashion-mnist"]),
])
def test_bad_input_is_one_line(tmp_path, tiny_yaml, over, words):
    out = tmp_path / "run"
    line = one_line_error(run_cli("train", tiny_yaml, "--out", out, *over))
    for w in words:
        assert w in line, (w, line)
    assert not (out / "teacher").exists()


def test_checkpoint_of_other_arch(tmp_path, tiny_yaml):
    from ptd.models import build_model
    from ptd.train.checkpoint import save_model

    save_model(tmp_path / "other.safetensors", build_model("vgg11", 10, 1, width=0.25))
    line = one_line_error(run_cli("train", tiny_yaml, "--out", tmp_path / "run", "--teacher", tmp_path / "other.safetensors"))
    assert "other.safetensors" in line and "vgg11" in line and "arch" in line


def test_existing_run_dir_is_not_overwritten(tmp_path, tiny_yaml):
    out = tmp_path / "run"
    assert main(["train", str(tiny_yaml), "--out", str(out), "--quiet"]) == 0
    before = {f: f.read_bytes() for f in out.rglob("*") if f.is_file()}
    line = one_line_error(run_cli("train", tiny_yaml, "--out", out, "--set", "teacher.optim.lr=0.2"))
    assert "teacher.optim.lr" in line and "--out" in line
    after = {f: f.read_bytes() for f in out.rglob("*") if f.is_file()}
    assert before == after
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "thesis.tex").write_text("precious")
    line = one_line_error(run_cli("train", tiny_yaml, "--out", tmp_path / "junk"))
    assert "not a ptd run directory" in line
    assert (tmp_path / "junk" / "thesis.tex").read_text() == "precious"


def test_every_subcommand_has_help():
    import argparse

    from ptd.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    cmds = list(sub.choices)
    assert {"run", "train", "prune", "student", "distill", "eval", "sweep", "report", "export", "compare"} <= set(cmds)
    top = run_cli("--help").stdout
    for cmd in cmds:  # every registered one, so a new command cannot ship without it
        r = run_cli(cmd, "--help")
        assert r.returncode == 0 and f"usage: ptd {cmd}" in r.stdout and cmd in top
        # argparse %-formats help= but prints description= as is: one string for both showed "95%%"
        assert "%%" not in r.stdout, (cmd, r.stdout)
    assert "%%" not in top


def test_eval_command(tmp_path, tiny_yaml):
    out = tmp_path / "run"
    assert main(["train", str(tiny_yaml), "--out", str(out), "--quiet"]) == 0
    cfg = yaml.safe_load(tiny_yaml.read_text())
    r = run_cli("eval", out / "teacher" / "model.safetensors", tiny_yaml)
    assert r.returncode == 0, r.stderr
    acc = json.loads((out / "teacher" / "result.json").read_text())["test_acc"]
    assert f"test acc {acc:.4f}" in r.stdout and " at 28x28; " in r.stdout
    # A model file records the size it was trained at: another is refused (a teacher trained at 32 px
    # scored 0.25 at the config's 224 without a word), and a run's model needs no config named.
    from ptd.train.checkpoint import load_model

    model_file = out / "teacher" / "model.safetensors"
    assert load_model(model_file).ptd_input_size == (28, 28)
    r = run_cli("eval", model_file, tiny_yaml, "--set", "data.image_size=32")
    assert r.returncode == 2 and r.stderr.strip() == (
        f"ptd: error: {model_file}: the model was trained on 28x28 images, but {tiny_yaml} with --set data.image_size=32 feeds it 32x32; set "
        f"data.image_size=28 or use the config it was trained with"), r.stderr
    r = run_cli("eval", model_file)
    assert r.returncode == 0 and f"test acc {acc:.4f}" in r.stdout and r.stdout.strip().endswith(f"; config {out / 'config.yaml'}"), r
    # The library call behind it (the CLI held the whole of it: no Python caller could score a file so).
    from ptd.config import load_config
    from ptd.evaluate import evaluate_model_file

    got = evaluate_model_file(load_config(str(tiny_yaml)), model_file)
    assert got["acc"] == acc and got["input_size"] == (28, 28) and got["params"] == got["nonzero"] > 0


def test_ptd_prune_prints_layers_in_the_networks_order_and_rounded_accuracies(tmp_path, tiny_fashion, capsys):
    """The per-layer table came out sorted as text (features.10 before features.3: safetensors keeps
    keys sorted), and the log printed val acc 0.43333333333333335."""
    cfg = tiny_config(tiny_fashion)
    cfg["teacher"]["model"] = {"arch": "vgg", "kwargs": {"plan": [8, 8, "M", 8, 8, "M", 8]}}
    cfg["teacher"]["optim"]["epochs"] = 1
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    assert main(["prune", str(p), "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr()
    layers = [l.split()[0] for l in out.out.splitlines() if l.startswith(("features.", "classifier"))]
    assert layers == ["features.0.weight", "features.3.weight", "features.7.weight", "features.10.weight", "features.14.weight",
                      "classifier.weight"], layers
    vals = re.findall(r"val acc (\S+)", out.out + out.err)
    assert vals and all(re.fullmatch(r"\d\.\d{4}|none", v) for v in vals), vals


def test_eval_feeds_the_model_the_size_it_checked(tmp_path, tiny_yaml, monkeypatch, capsys):
    """The size check passed at data.image_size while the test loader was built without it: the
    model was scored at the data's own size (28 here, 224 for a folder) under a line saying 32x32."""
    import ptd.train.loop as loop
    from ptd.models import build_model
    from ptd.train import checkpoint as ckpt

    m = build_model("vgg", 10, 1, plan=[8, "M", 16])
    m.ptd_input_size = (32, 32)
    ckpt.save_model(tmp_path / "m.safetensors", m)
    fed, real = [], loop.evaluate

    def spy(model, loader, rt):
        fed.extend(tuple(x.shape[-2:]) for x, *_ in loader)
        return real(model, loader, rt)

    monkeypatch.setattr(loop, "evaluate", spy)
    assert main(["eval", str(tmp_path / "m.safetensors"), str(tiny_yaml), "--set", "data.image_size=32"]) == 0
    assert fed and set(fed) == {(32, 32)} and " at 32x32; " in capsys.readouterr().out


def test_a_teacher_checkpoint_of_another_image_size_is_refused(tmp_path, tiny_yaml):
    """A teacher file recording 28x28, run at data.image_size 64: it was scored, pruned and taught
    from at a size it never saw, and the run's teacher file then recorded 64x64."""
    from ptd.models import build_model
    from ptd.train import checkpoint as ckpt
    from ptd.train.checkpoint import CheckpointError

    cfg = load_config(tiny_yaml)
    m = build_model(cfg.teacher.model.arch, 10, 1, **cfg.teacher.model.kwargs)
    m.ptd_input_size = (28, 28)
    ckpt.save_model(tmp_path / "t.safetensors", m)
    with pytest.raises(CheckpointError, match=r"t\.safetensors: the teacher was trained on 28x28 images, but this run feeds it "
                                              r"64x64; set data.image_size=28 or use the config it was trained with, or give a "
                                              r"teacher trained at 64x64"):
        run_pipeline(load_config(tiny_yaml, [f"teacher.checkpoint={tmp_path / 't.safetensors'}", "data.image_size=64",
                                             "teacher.check_learned=false"]),
                     tmp_path / "run", until="teacher")
    assert not (tmp_path / "run").exists()
    r = run_pipeline(load_config(tiny_yaml, [f"teacher.checkpoint={tmp_path / 't.safetensors'}", "teacher.check_learned=false"]),
                     tmp_path / "ok", until="teacher")  # an untrained stand-in
    assert r["test_acc"] >= 0 and ckpt.load_model(tmp_path / "ok" / "teacher" / "model.safetensors").ptd_input_size == (28, 28)


def test_a_model_scored_or_taught_from_on_data_whose_classes_it_numbers_otherwise_is_refused(tmp_path, tiny_yaml, capsys):
    """Model files record their outputs' class names. A model scored on data with the same class
    count in another order (a Tiny-ImageNet wnids.txt remade with ls, an ImageFolder with a folder
    renamed) was scored against relabelled images without a word, near chance; a teacher file
    likewise was pruned and taught from."""
    from ptd.data import load_configured
    from ptd.models import build_model
    from ptd.train import checkpoint as ckpt
    from ptd.train.checkpoint import CheckpointError

    cfg = load_config(tiny_yaml)
    classes = load_configured(cfg.data, 0).classes
    out = tmp_path / "run"
    assert main(["train", str(tiny_yaml), "--out", str(out), "--quiet"]) == 0
    assert ckpt.load_model(out / "teacher" / "model.safetensors").ptd_classes == classes
    m = build_model(cfg.teacher.model.arch, 10, 1, **cfg.teacher.model.kwargs)
    m.ptd_classes = classes[1::-1] + classes[2:]  # the first two swapped
    f = tmp_path / "swapped.safetensors"
    ckpt.save_model(f, m)
    capsys.readouterr()
    assert main(["eval", str(f), str(tiny_yaml)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"ptd: error: {f}: the model's class 0 is {classes[1]!r} but data.name=fashion_mnist numbers {classes[0]!r} there "
        f"(the same classes in another order); use the data it was trained on, with its class list (e.g. the dataset's "
        f"own wnids.txt) unchanged"]
    with pytest.raises(CheckpointError, match=r"swapped\.safetensors: the teacher's class 0 is"):
        run_pipeline(load_config(tiny_yaml, [f"teacher.checkpoint={f}"]), tmp_path / "t", until="teacher")
    assert not (tmp_path / "t").exists()
    m.ptd_classes = ["x"] * 10
    ckpt.save_model(f, m)
    assert main(["eval", str(f), str(tiny_yaml)]) == 2
    assert "(10 of its 10 classes are not among the data's)" in capsys.readouterr().err
    m.ptd_classes = None  # a file recording no classes (a ptd file from before the record) is not checked
    ckpt.save_model(f, m)
    assert main(["eval", str(f), str(tiny_yaml)]) == 0
    (tmp_path / "bad.safetensors").write_bytes(f.read_bytes())
    meta = ckpt.read_metadata(f)
    ckpt.save_tensors(tmp_path / "bad.safetensors", dict(m.state_dict()), {**meta, "classes": "[1, 2]"})
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "bad.safetensors"), str(tiny_yaml)]) == 2
    assert "its recorded classes '[1, 2]' are not a list of class names" in capsys.readouterr().err


def test_named_student(tmp_path, tiny_yaml):
    cfg = load_config(tiny_yaml, ["student.source=named", "student.model={arch: vgg, kwargs: {plan: [8, M, 16, M]}}"])
    stats = run_pipeline(cfg, tmp_path / "run", until="student")
    assert stats["spec"]["plan"] == [8, "M", 16, "M"]
    assert json.loads((tmp_path / "run" / "student" / "architecture.json").read_text())["plan"] == [8, "M", 16, "M"]


def test_student_stage_passes_the_rounding_config(tmp_path, tiny_yaml, monkeypatch):
    import ptd.students

    seen = []
    real = ptd.students.derive_configured

    def spy(*a, **kw):
        seen.append({k: kw.get(k) for k in ("round_to", "round_narrower", "device_type")})
        return real(*a, **kw)

    monkeypatch.setattr(ptd.students, "derive_configured", spy)
    cfg = load_config(tiny_yaml, ["student.round_to=4", "student.round_narrower=false"])
    stats = run_pipeline(cfg, tmp_path / "run", until="student")
    # preflight's check, then the student stage, both for the device the run trains on
    assert seen == [{"round_to": 4, "round_narrower": False, "device_type": "cpu"}] * 2
    assert stats["plan"]["round_to"] == 4 and stats["plan"]["round_to_choice"] == ""
    assert all(r["width"] % 4 == 0 or "not rounded" in r["note"] or r["note"] for r in stats["plan"]["layers"])
    assert load_config(tiny_yaml).student.round_narrower is True  # the default


def test_student_stage_times_both_runtimes_on_the_runs_threads(tmp_path, tiny_yaml):
    """PyTorch and onnxruntime latency in the student report run on the same thread count (the run's)."""
    cfg = load_config(tiny_yaml, ["threads=2"])
    stats = run_pipeline(cfg, tmp_path / "run", until="student")
    assert stats["onnx_latency"]["threads"] == 2
    assert "latency in onnxruntime (2 threads" in (tmp_path / "run" / "student" / "report.txt").read_text()


class UserNet(torch.nn.Module):
    """A model ptd has never seen: a residual add and a classifier, registered by the user."""

    def __init__(self, num_classes=10, in_channels=1, width=1.0):
        super().__init__()
        c = int(16 * width)
        self.stem = torch.nn.Conv2d(in_channels, c, 3, padding=1)
        self.body = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.BatchNorm2d(c), torch.nn.ReLU(),
                                        torch.nn.Conv2d(c, c, 3, padding=1))
        self.head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(c, num_classes))

    def forward(self, x):
        h = self.stem(x)
        return self.head(torch.relu(h + self.body(h)))


def test_users_own_module_through_the_registry(tmp_path, tiny_fashion):
    """A user's nn.Module, registered by name, goes through the whole pipeline: pruned, a student
    derived by channel surgery, distilled, and the saved student rebuilt from its description."""
    from ptd.models import MODELS
    from ptd.train.checkpoint import load_model

    if "user_net" not in MODELS:
        MODELS.register("user_net")(UserNet)
    cfg = tiny_config(tiny_fashion, distill={"seeds": [0], "arms": ["pruned_teacher"], "optim": {"epochs": 1, "batch_size": 64, "lr": 0.05}})
    cfg["teacher"]["model"] = {"arch": "user_net"}
    cfg["prune"]["target_sparsity"] = 0.79  # far enough that whole channels die
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    r = run_pipeline(load_config(p), tmp_path / "run")
    assert r["student"]["params"] < r["teacher"]["params"]
    student = load_model(tmp_path / "run" / "distill" / "pruned_teacher_seed0" / "model.safetensors")
    assert isinstance(student, UserNet)
    # The residual add couples stem and body output: one width for both. Whether a channel of that
    # group dies depends on the seed streams; the uncoupled inner conv is pruned in any case.
    assert student.stem.out_channels == student.body[4].out_channels
    assert student.body[1].out_channels < 16 and student.body[4].in_channels == student.body[1].out_channels


def test_run_stage_skips_done_and_marks_done_before_cleanup(tmp_path):
    from types import SimpleNamespace

    from ptd import paths as P
    from ptd.pipeline import is_done, mark_done, run_stage
    from ptd.train import checkpoint as ckpt

    d = tmp_path / "stage"
    order = []
    ctx = SimpleNamespace(main=True, in_worker=False, write_json=lambda p, o: (order.append("result"), ckpt.write_json(p, o)),
                          done=lambda p, inputs=(): (order.append("done"), mark_done(p)), is_done=is_done,
                          log=order.append, run_dir=tmp_path)

    def boom():
        (d / P.RESUME).write_text("resume")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stage(ctx, d, boom)
    assert not is_done(d) and (d / P.RESUME).is_file()  # an interrupted stage keeps its resume files

    def compute():
        assert (d / P.RESUME).is_file()  # the next session finds them
        order.append("compute")
        return {"acc": 0.5}

    assert run_stage(ctx, d, compute) == ({"acc": 0.5}, True)
    assert order == ["compute", "result", "done"] and is_done(d) and not (d / P.RESUME).exists()
    assert run_stage(ctx, d, lambda: pytest.fail("a done stage must not run again")) == ({"acc": 0.5}, False)
    assert order[-1] == "[reused] stage: finished earlier"


class GroupedNet(torch.nn.Module):
    """A grouped (not depthwise) conv: ptd cannot derive a student from it."""

    def __init__(self, num_classes=10, in_channels=1, width=1.0):
        super().__init__()
        self.a = torch.nn.Conv2d(in_channels, 8, 3, padding=1)
        self.b = torch.nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.head = torch.nn.Linear(8, num_classes)

    def forward(self, x):
        return self.head(self.b(torch.relu(self.a(x))).mean((2, 3)))


def test_an_underivable_teacher_is_refused_before_work_starts(tmp_path, tiny_fashion, capsys, monkeypatch):
    """Not after the teacher trained and was pruned: one line, exit 2, no run directory."""
    from ptd.cli import main
    from ptd.models import MODELS

    monkeypatch.setitem(MODELS._items, "grouped_net", GroupedNet)  # registered for this test only
    cfg = tiny_config(tiny_fashion)
    cfg["teacher"]["model"] = {"arch": "grouped_net"}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(p), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "student.source: derive" in err and "grouped conv" in err and "student.model" in err
    assert not (tmp_path / "run").exists()
    # A named student needs no derivation: the same teacher passes preflight.
    from ptd.preflight import preflight

    cfg["student"] = {"source": "named", "model": {"arch": "vgg", "kwargs": {"plan": [8, "M", 8]}}}
    p.write_text(yaml.safe_dump(cfg))
    preflight(load_config(p), tmp_path / "run2")


def test_a_model_onnx_cannot_take_is_a_report_line_not_the_end_of_the_run(tmp_path, tiny_yaml, monkeypatch):
    """The student stage comes after the teacher's training and pruning: an exporter or onnxruntime
    failure there is recorded and said, and the run goes on (here to its report)."""
    import ptd.export
    from ptd.export import ExportError

    def refuse(*a, **k):
        raise ExportError("VGG cannot be exported to ONNX (UnsupportedOperatorError: aten::foo)")

    monkeypatch.setattr(ptd.export, "onnx_latency", refuse)
    cfg = load_config(tiny_yaml, ["distill.seeds=[0]", "distill.optim.epochs=1"])
    r = run_pipeline(cfg, tmp_path / "run")
    ort = r["student"]["onnx_latency"]
    assert ort["error"].startswith("ExportError: VGG cannot be exported to ONNX")
    assert "latency in onnxruntime: not measured (ExportError" in (tmp_path / "run" / "student" / "report.txt").read_text()
    assert "| onnxruntime | - | n/a | n/a | ExportError: VGG cannot be exported" in (tmp_path / "run" / "report.md").read_text()
    assert r["students"]  # the run went on to distill and report


def test_milestones_past_the_last_epoch_are_noted_once_per_schedule(tmp_path, tiny_fashion):
    """A teacher of 3 epochs decaying at 2 and 5 (5 is never reached), retraining rounds of 1 epoch
    decaying at 1 and 84 (neither: the scheduler steps after each epoch): each said once, although
    2 retraining rounds train; the distillation (no milestones) says nothing."""
    cfg = tiny_config(tiny_fashion)
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    lines: list[str] = []
    c = load_config(p, ["quiet=true", "threads=1", "teacher.optim.milestones=[2, 5]", "prune.retrain.milestones=[1, 84]"])
    run_pipeline(c, tmp_path / "run", until="prune", log=lines.append)
    notes = [l for l in lines if "note: milestones" in l]
    assert notes == [
        "[teacher.optim] note: milestones [5] are not before its last epoch (3), so the learning rate never decays at them; "
        "set teacher.optim.milestones below 3 if a decay was meant, or [] for a constant rate",
        "[prune.retrain] note: milestones [1, 84] are not before its last epoch (1), so the learning rate never decays at all; "
        "set prune.retrain.milestones below 1 if a decay was meant, or [] for a constant rate"]


@pytest.mark.parametrize("strategy, target", [("oneshot", 0.999), ("gmp", 0.999)])
def test_a_level_that_empties_a_layer_stops_the_run_in_one_line(tmp_path, tiny_fashion, capsys, strategy, target):
    """0.999 keeps 14 of the tiny teacher's 14,288 weights: enough for one per layer, so the
    up-front arithmetic lets it through, but global magnitude gives all 14 to the layers with the
    largest weights and empties the others (layer collapse). The run stops in one line naming the
    emptied layers -- before the level's retraining for one-shot, when the level's masks are final
    for GMP -- and the teacher stage stays done for a re-run with a lower target."""
    cfg = tiny_config(tiny_fashion, prune={"strategy": strategy, "target_sparsity": target},
                      distill={"seeds": [0], "arms": ["pruned_teacher"]})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(["run", str(tmp_path / "c.yaml"), "--out", str(out)]) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(err) == 1 and "layer collapse" in err[0] and "removed every weight of features." in err[0], err
    assert "prune.target_sparsity" in err[0] and "Traceback" not in err[0]
    # a lower target is another config, so another --out; the line says how to keep the teacher
    assert err[0].endswith(f"to reuse this run's trained teacher there, add --teacher {out / 'teacher' / 'model.safetensors'}")
    assert (out / "teacher" / "done").is_file() and not (out / "prune" / "done").exists()
    assert not (out / "prune" / "level_1" / "done").exists() and not (out / "distill").exists()
    # the emptied layers named are really empty under those scores: the same masks, recomputed
    from ptd.pruning.masks import emptied_layers
    from ptd.pruning.scores import magnitude
    from ptd.pruning.select import global_topk, keep_for_target
    from ptd.train.checkpoint import load_model
    if strategy == "oneshot":
        from ptd.pruning.masks import full_masks, prunable_weights
        t = load_model(out / "teacher" / "model.safetensors")
        full = full_masks(prunable_weights(t))
        empty = emptied_layers(global_topk(magnitude(t, full), full, keep_for_target(full, target)))
        assert empty and all(n in err[0] for n in empty[:3])


def test_models_are_measured_at_the_size_they_train_at(tmp_path):
    """data.image_size (folder datasets) is the size the loaders crop to; the student stage's FLOPs,
    latency and ONNX timing, SynFlow's input and the memory check all take their input from
    ptd.data.frame_size, which the student stage once skipped (it measured at the folder loader's
    224 while training at the configured size)."""
    from types import SimpleNamespace

    from ptd.config import load_config
    from ptd.data import frame_size
    from ptd.pipeline import Context

    splits = SimpleNamespace(in_channels=3, image_size=(224, 224))
    assert Context(load_config(None, ["data.image_size=64"]), tmp_path, None, splits, print).input_shape == (3, 64, 64)
    assert Context(load_config(None), tmp_path, None, splits, print).input_shape == (3, 224, 224)
    assert frame_size(SimpleNamespace(image_size=(28, 30)), None) == (28, 30) and frame_size(splits, 32) == (32, 32)


def test_a_student_stage_redone_keeps_the_distillations_made_from_it(tmp_path, tiny_yaml):
    """Distillations record what their student was made from. That was student/stats.json, which
    also holds measured latencies: a student stage redone (its done lost, or student/ deleted as
    an earlier message advised) came out with other timings, and every finished distillation was
    refused for good, the stats.json the message said to restore already overwritten (bad-input
    audit). It is now the student's architecture (and inherited weights), which a redo reproduces."""
    import hashlib
    import shutil

    out = tmp_path / "run"
    cfg = load_config(tiny_yaml, ["distill.arms=[scratch, pruned_teacher]", "distill.seeds=[0]"])
    run_pipeline(cfg, out)

    def models() -> dict[str, str]:
        return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*.safetensors")}

    before = models()
    (out / "student" / "done").unlink()
    r = run_pipeline(cfg, out)  # the student is derived again, identically; the students are reused
    assert models() == before and len(r["students"]) == 2
    shutil.rmtree(out / "student")
    run_pipeline(cfg, out)
    assert models() == before


def test_a_rerun_says_which_stages_it_reused(tmp_path, tiny_yaml):
    """A re-run after a kill said nothing of the stages it skipped: the log went from the command
    to the next stage's first line, or straight to "done in 3 s" (new-user audit)."""
    from ptd.config import load_config
    from ptd.pipeline import run_pipeline

    cfg = load_config(str(tiny_yaml), ["threads=1", "teacher.optim.epochs=1"])
    first, again = [], []
    run_pipeline(cfg, tmp_path / "run", log=first.append, until="teacher")
    run_pipeline(cfg, tmp_path / "run", log=again.append, until="prune")
    assert not any(l.startswith("[reused]") for l in first)
    assert "[reused] teacher: finished earlier" in again, again
    # the plan says how much of its work is already there (real-data audit: it counted all of it)
    assert first[0] == "[plan] teacher 1 epoch: 1 epoch of training in all"
    assert again[0] == ("[plan] teacher 1 epoch; pruning 2 rounds of 1 epoch: 3 epochs of training in all, 1 epoch of them "
                        "finished earlier (reused)"), again[0]


def test_ptd_train_prints_every_teacher_replicate(tmp_path, tiny_yaml, capsys):
    """With teacher.seeds 2, ptd train and ptd prune printed replicate 0's result alone (review)."""
    import json

    out = tmp_path / "run"
    argv = [str(tiny_yaml), "--out", str(out), "--quiet", "--set", "teacher.seeds=2", "--set", "teacher.optim.epochs=1",
            "--set", "threads=1"]
    assert main(["train", *argv]) == 0
    lines = [l for l in capsys.readouterr().out.strip().splitlines() if l.startswith("teacher")]
    accs = [json.loads((d / "teacher" / "result.json").read_text())["test_acc"] for d in (out, out / "teachers" / "r1")]
    assert [l[:l.index(" (val ")] for l in lines] == [f"teacher replicate {k} test acc {a:.4f}" for k, a in enumerate(accs)], lines
    assert lines[1].endswith(str(out / "teachers" / "r1" / "teacher" / "model.safetensors"))


def test_a_run_says_what_it_will_train_before_it_starts():
    """Each stage's bar has its own ETA, but nothing said how many stages follow, so the first bar's
    ETA read as the run's (new-user audit). The demo: teacher 8, IMP 4 rounds of 2, the control the
    same, 4 arms x 2 seeds of 4 epochs: 8 + 8 + 8 + 32 = 56."""
    from ptd.config import load_config
    from ptd.pipeline import plan_line

    c = load_config("configs/fashion_mnist_demo.yaml")
    assert list(c.distill.arms) == ["scratch", "unpruned_teacher", "pruned_teacher", "retrained_teacher"]
    assert plan_line(c, "report", c.distill.arms) == (
        "[plan] teacher 8 epochs; pruning 4 rounds of 2 epochs; control 4 rounds of 2 epochs; 8 students of 4 epochs "
        "(4 arms, 2 seeds): 56 epochs of training in all (a student's epoch is cheaper: a smaller net)")
    assert plan_line(c, "teacher", c.distill.arms) == "[plan] teacher 8 epochs: 8 epochs of training in all"
    c = load_config("configs/fashion_mnist_demo.yaml", ["teacher.seeds=2", "distill.loss=[kd,dkd]"])
    line = plan_line(c, "report", c.distill.arms)  # scratch once per seed, each teacher arm per loss: (2 + 3 x 2 x 2) x 2
    assert "28 students of 4 epochs (4 arms, 2 seeds, 2 losses for each arm with a teacher, 2 teacher replicates)" in line
    assert line.endswith(f": {2 * (8 + 8 + 8) + 28 * 4} epochs of training in all (a student's epoch is cheaper: a smaller net)")


def test_a_loaded_teacher_that_numbers_the_classes_otherwise_is_refused_before_any_work(tmp_path, tiny_yaml, capsys):
    """A plain state dict records no class names: a teacher numbering the classes otherwise (an
    ImageFolder-sorted Tiny-ImageNet, where ptd follows wnids.txt) loaded, scored near chance, and
    was pruned and taught from for the whole run, the report's 'did not learn' coming after all of
    it (real-data audit). Scored on the validation images first, it is refused in one line, nothing
    written; teacher.check_learned=false takes it anyway."""
    from ptd.models import build_model
    from ptd.train.checkpoint import load_model

    out = tmp_path / "trained"
    assert main(["train", str(tiny_yaml), "--out", str(out), "--quiet", "--set", "threads=1"]) == 0
    teacher = load_model(out / "teacher" / "model.safetensors")
    state = teacher.state_dict()
    head = [k for k in state if k.endswith("weight")][-1]  # the classifier: its rows are the classes
    bias = head[: -len("weight")] + "bias"
    order = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9, 0])  # every class renumbered
    mine = tmp_path / "sorted_otherwise.pt"
    torch.save({k: (v[order] if k in (head, bias) else v) for k, v in state.items()}, mine)
    capsys.readouterr()
    argv = ["prune", str(tiny_yaml), "--teacher", str(mine), "--out", str(tmp_path / "run"), "--quiet", "--set", "threads=1"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"ptd: error: {mine}: the teacher scores ") and "not above chance" in err[0], err
    assert "(ptd numbers these 0 = T-shirt/top, 1 = Trouser, 2 = Pullover, ...)" in err[0] and "teacher.check_learned=false" in err[0]
    assert not (tmp_path / "run").exists()
    assert main(["train", str(tiny_yaml), "--teacher", str(out / "teacher" / "model.safetensors"), "--out",
                 str(tmp_path / "right"), "--quiet", "--set", "threads=1"]) == 0  # its own order: taken
    assert main(["train", str(tiny_yaml), "--teacher", str(mine), "--out", str(tmp_path / "anyway"), "--quiet", "--set", "threads=1",
                 "--set", "teacher.check_learned=false"]) == 0


def test_a_run_whose_data_changed_between_sessions_is_refused(tmp_path, capsys):
    """Deleting 6 training images between two sessions went unnoticed: the teacher and the first
    students were reused, the new students trained on other data and another validation split
    (real-data audit). data.json records what the first session loaded; a later session on other
    data is refused in one line before it writes anything, and --from checks the run it copies."""
    from conftest import tiny_config, write_fashion_like

    data = write_fashion_like(tmp_path / "fm", n_train=600)
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(tiny_config(data, threads=1)))
    out = tmp_path / "run"
    assert main(["train", str(p), "--out", str(out), "--quiet"]) == 0
    rec = json.loads((out / "data.json").read_text())
    assert rec["images"] == {"train": 480, "val": 120, "test": 200} and len(rec["sha256"]) == 64
    assert main(["prune", str(p), "--out", str(out), "--quiet"]) == 0  # the same data: grows
    before = sorted((f.relative_to(out).as_posix(), f.stat().st_mtime_ns) for f in out.rglob("*"))
    write_fashion_like(data, n_train=594)  # 6 training images fewer
    capsys.readouterr()
    assert main(["distill", str(p), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"ptd: error: {out}: the data changed since this run started (train 480 then, 475 now; val 120 then, 119 "
                   f"now): its finished stages were trained on the data then; restore that data, or pass --out a new "
                   f"directory"), err
    assert sorted((f.relative_to(out).as_posix(), f.stat().st_mtime_ns) for f in out.rglob("*")) == before
    assert main(["student", str(p), "--from", str(out), "--out", str(tmp_path / "other"), "--quiet"]) == 2
    assert "(--from) was made (train 480 then, 475 now" in capsys.readouterr().err and not (tmp_path / "other").exists()


def test_a_folder_dataset_rewritten_in_place_is_a_data_change(tmp_path):
    """data.json hashed a folder split's paths and labels only: images resized or re-encoded in
    place (the same names) passed as the same data. Their byte counts are recorded too; a
    data.json from before that record is compared on what it holds, and still accepted."""
    from types import SimpleNamespace

    from ptd.data.base import DataError, FolderSplit, Split, fingerprint
    from ptd.pipeline import data_change

    root = tmp_path / "data"
    files = []
    for i in range(4):
        f = root / f"c{i % 2}" / f"{i}.png"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"x" * (100 + i))
        files.append((str(f), i % 2))
    mem = Split(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]))
    splits = SimpleNamespace(train=FolderSplit(files[:2]), val=FolderSplit(files[2:]), test=mem)
    fp = fingerprint(splits, str(root))
    assert set(fp) == {"images", "sha256", "file_sizes"} and fp["images"] == {"train": 2, "val": 2, "test": 2}
    run = tmp_path / "run"
    run.mkdir()
    (run / "data.json").write_text(json.dumps(fp))
    assert data_change(run, fingerprint(splits, str(root))) is None
    Path(files[3][0]).write_bytes(b"y" * 50)  # re-encoded in place: the same path, label and count
    now = fingerprint(splits, str(root))
    assert now["sha256"] == fp["sha256"] and now["file_sizes"] != fp["file_sizes"]
    assert data_change(run, now) == (f"{run}: the data changed since this run started (the same image paths and labels, "
                                     f"other file sizes: images rewritten in place): its finished stages were trained on "
                                     f"the data then; restore that data, or pass --out a new directory")
    (run / "data.json").write_text(json.dumps({k: v for k, v in fp.items() if k != "file_sizes"}))  # an older ptd's record
    assert data_change(run, now) is None  # (open_run_dir then adds the sizes: test_an_older_data_record_gains_file_sizes)
    assert fingerprint(SimpleNamespace(train=mem, val=mem, test=mem)).keys() == {"images", "sha256"}  # in memory: pixels hashed
    Path(files[0][0]).unlink()
    with pytest.raises(DataError, match=r"^cannot read .*0\.png \(No such file or directory\); restore it"):
        fingerprint(splits, str(root))


def test_the_loaded_teacher_check_reads_every_class_not_the_first_images(tmp_path):
    """A folder split is sorted by class: its first 1,000 validation images were all of class 0,
    where chance is 100%, and a perfect teacher was refused (review). The sample is spread evenly."""
    from types import SimpleNamespace

    from ptd.config import load_config
    from ptd.data import Split
    from ptd.preflight import check_teacher_learned

    n = 2000
    y = torch.cat([torch.zeros(n // 2, dtype=torch.long), torch.ones(n // 2, dtype=torch.long)])  # sorted by class
    x = torch.zeros(n, 1, 4, 4, dtype=torch.uint8)
    x[y == 1] = 255  # class = brightness

    class Perfect(torch.nn.Module):
        def forward(self, t):
            bright = t.flatten(1).mean(1) > 0
            return torch.stack([(~bright).float(), bright.float()], 1)

    splits = SimpleNamespace(val=Split(x, y), test=Split(x, y), mean=(0.5,), std=(0.5,), num_classes=2, classes=["dark", "bright"])
    cfg = load_config(None, ["teacher.checkpoint=/t.safetensors", "threads=1"])
    check_teacher_learned(cfg, Perfect(), splits)  # passes: half of each class in the sample
    class Constant(torch.nn.Module):
        def forward(self, t):
            return torch.tensor([[1.0, 0.0]]).expand(len(t), 2)

    with pytest.raises(Exception, match=r"scores 50\.00% on 500 validation images .* not above chance \(50\.00%\)"):
        check_teacher_learned(cfg, Constant(), splits)


@pytest.mark.parametrize("key, value, hint", [("prune.strategy", "imp-finetune", "imp_finetune"), ("distill.loss", "KD", "kd"),
                                              ("teacher.model.arch", "VGG", "vgg")])
def test_a_mistyped_strategy_loss_or_model_names_the_one_it_likely_meant(tmp_path, tiny_yaml, capsys, key, value, hint):
    """The hint reached Registry.get's callers only: strategies, losses and models are refused by
    check_plugins, which gave none (review)."""
    assert main(["train", str(tiny_yaml), "--out", str(tmp_path / "run"), "--set", f"{key}={value}"]) == 2
    err = capsys.readouterr().err
    assert f"{value!r} (did you mean {hint!r}?); valid" in err and not (tmp_path / "run").exists(), err


def test_the_student_stage_builds_the_same_student_whatever_ran_before_it(tmp_path, tiny_yaml, monkeypatch):
    """The student stage was not seeded: its student (random init, measured nonzero count, the
    student_init an inheriting run keeps) came from the RNG left by the stages before it, so a
    session that computed teacher and pruning and one that reused them built different students
    (crash audit). Two ways to the student stage; the RNG it starts from is the same."""
    import hashlib

    import ptd.students as S
    from ptd.config import load_config

    seen = []
    orig = S.derive_configured

    def spy(*a, **k):
        if sys._getframe(1).f_code.co_filename.endswith(os.path.join("pipeline", "stages.py")):  # the stage's call, not preflight's check
            seen.append(hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest())
        return orig(*a, **k)

    monkeypatch.setattr(S, "derive_configured", spy)
    cfg = load_config(tiny_yaml, ["threads=1", "distill.seeds=[0]"])
    run_pipeline(cfg, tmp_path / "a", until="student")  # teacher, prune, student in one session
    run_pipeline(cfg, tmp_path / "b", until="prune")
    torch.manual_seed(12345)  # whatever a caller left
    run_pipeline(cfg, tmp_path / "b", until="student")  # teacher and prune reused
    assert len(seen) == 2 and seen[1] == seen[0], seen
    a, b = (json.loads((tmp_path / x / "student" / "stats.json").read_text())["student"] for x in "ab")
    assert a["nonzero"] == b["nonzero"] and a["params"] == b["params"]


@pytest.mark.slow
def test_pruning_and_control_rounds_train_the_same_whatever_ran_before_them(tmp_path, tiny_yaml):
    """Dropout draws from torch's global RNG, which the pruning levels and control rounds did not
    seed: a mobilenetv2 teacher (dropout 0.2) pruned in the session that trained it and one pruned
    after the teacher was reused came out with other weights (review). Each fit is seeded now."""
    from ptd.config import load_config

    over = ["threads=1", "teacher.model={arch: mobilenetv2, width: 0.25, kwargs: {}}", "teacher.optim.epochs=1", "distill.seeds=[0]",
            "distill.arms=[retrained_teacher]", "distill.optim.epochs=1"]
    cfg = load_config(tiny_yaml, over)
    run_pipeline(cfg, tmp_path / "a", until="distill")  # one session
    run_pipeline(cfg, tmp_path / "b", until="teacher")
    torch.manual_seed(999)  # whatever the session did before
    run_pipeline(cfg, tmp_path / "b", until="distill")  # teacher reused
    files = sorted(f.relative_to(tmp_path / "a") for f in (tmp_path / "a").rglob("model.safetensors")
                   if f.parts[-3] in ("prune", "control") or f.parts[-2] in ("prune", "control"))
    assert any("prune" in f.parts for f in files) and any("control" in f.parts for f in files), files
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_an_older_data_record_gains_file_sizes(tmp_path):
    """data.json is written once, by the first session: a run directory from before the file-size
    record never gained it, and stayed blind to images rewritten in place (review). A later session
    whose data matches the older record on what it holds adds the sizes."""
    from conftest import tiny_config
    from test_data import write_imagefolder

    from ptd.config import load_config

    write_imagefolder(tmp_path / "img")
    cfg = tiny_config(tmp_path / "img", threads=1)
    cfg["data"] = {"name": "imagefolder", "root": str(tmp_path / "img"), "image_size": 16, "crop_padding": 2}
    cfg["teacher"]["model"] = {"arch": "vgg", "kwargs": {"plan": [8, "M", 8]}}
    cfg["teacher"]["optim"].update(epochs=1, batch_size=4, milestones=[])
    cfg["prune"]["retrain"]["batch_size"] = cfg["distill"]["optim"]["batch_size"] = 4
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    c = load_config(tmp_path / "c.yaml")
    out = tmp_path / "run"
    run_pipeline(c, out, until="teacher")
    rec = json.loads((out / "data.json").read_text())
    assert len(rec["file_sizes"]) == 64
    (out / "data.json").write_text(json.dumps({k: v for k, v in rec.items() if k != "file_sizes"}))  # as an older ptd wrote it
    run_pipeline(c, out, until="teacher")  # the same data: reused, and the record completed
    assert json.loads((out / "data.json").read_text()) == rec
