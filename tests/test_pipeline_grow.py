"""Several distillation losses in one run, runs that grow, and teacher replicates: tiny runs end
to end, and the one-line answers to bad input."""
import json

import pytest
import yaml

from conftest import tiny_config
from test_pipeline import one_line_error, run_cli
from ptd.config import load_config
from ptd.pipeline import RunDirError, run_pipeline

AT = {"teacher_layers": ["features.2", "features.6"]}  # the ReLUs after the tiny VGG's first two convs


def write(tmp_path, cfg, name="c.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg))
    return p


def rows_of(r, **keys):
    return [s for s in r["students"] if all(s.get(k) == v for k, v in keys.items())]


@pytest.mark.slow
def test_two_losses_distill_every_teacher_arm_with_each(tmp_path, tiny_fashion):
    cfg = tiny_config(tiny_fashion, distill={"loss": ["kd", "at"], "options": {"at": AT}, "seeds": [0, 1],
                                             "optim": {"epochs": 1, "batch_size": 64, "lr": 0.05}})
    out = tmp_path / "run"
    r = run_pipeline(load_config(write(tmp_path, cfg)), out)
    names = sorted(p.name for p in (out / "distill").iterdir())
    # The first loss keeps today's names (so a run grown from one loss keeps its students);
    # the scratch arm has no teacher, so it is trained once, not once per loss.
    assert names == sorted([f"{a}_seed{s}" for a in ("scratch", "unpruned_teacher", "pruned_teacher") for s in (0, 1)]
                           + [f"{a}-at_seed{s}" for a in ("unpruned_teacher", "pruned_teacher") for s in (0, 1)])
    assert sorted((s["arm"], s["loss"], s["seed"]) for s in r["students"]) == sorted(
        [("scratch", None, s) for s in (0, 1)] + [(a, l, s) for a in ("unpruned_teacher", "pruned_teacher") for l in ("kd", "at") for s in (0, 1)])
    assert list(r["losses"]) == ["kd", "at"] and r["distill_losses"] == ["kd", "at"]
    assert r["comparison"] == r["losses"]["kd"]["comparison"]  # the top level is the first loss's
    for loss in ("kd", "at"):
        c = r["losses"][loss]["comparison"]
        acc = {(s["arm"], s["seed"]): s["test_acc"] for s in r["students"] if s["loss"] in (loss, None)}
        want = [acc[("pruned_teacher", sd)] - acc[("unpruned_teacher", sd)] for sd in (0, 1)]
        assert c["pruned_minus_unpruned"]["per_seed"] == {0: pytest.approx(want[0]), 1: pytest.approx(want[1])}
        assert c["pruned_minus_unpruned"]["mean"] == pytest.approx(sum(want) / 2) and c["pruned_minus_unpruned"]["n"] == 2
        # Each loss is compared with the same scratch students.
        sc = [acc[("pruned_teacher", sd)] - acc[("scratch", sd)] for sd in (0, 1)]
        assert c["pruned_minus_scratch"]["mean"] == pytest.approx(sum(sc) / 2)
        assert r["losses"][loss]["summary"]["pruned_teacher"]["n"] == 2
    # The at students really were trained with the at loss: its term is in their metrics.
    terms = lambda d: set(json.loads((out / "distill" / d / "metrics.jsonl").read_text().splitlines()[0])["terms"])
    assert terms("pruned_teacher-at_seed0") == {"ce", "at"} and terms("pruned_teacher_seed0") == {"ce", "kd_soft"}
    assert terms("scratch_seed1") == {"ce"}
    from ptd.train.tensorboard import available

    if available():  # TensorBoard scalars mirror the run's layout
        assert any((out / "tensorboard" / "distill" / "pruned_teacher-at_seed0").iterdir())
    md = (out / "report.md").read_text()
    assert "## Per distillation loss" in md and "| at | pruned minus unpruned |" in md and "| kd | pruned minus unpruned |" in md
    assert "Per distillation loss" in (out / "report.html").read_text()


@pytest.mark.parametrize("over, words", [
    (["--set", "distill.loss=[kd, nope]"], ["distill.loss", "'nope'", "valid"]),
    (["--set", "distill.loss=[kd, at]", "--set", "distill.options={at: {bogus: 1}}"], ["distill.options.at", "bogus"]),
    (["--set", "distill.loss=[kd, at]", "--set", "distill.options={at: {teacher_layers: [features.22]}}"],
     ["distill.options.at", "'features.22'", "teacher", "nearest: features.2"]),
    # Shapes the loss cannot bridge: FitNet from a flat teacher embedding to a student feature map.
    (["--set", "distill.loss=[fitnet]", "--set", "distill.options={fitnet: {teacher_layer: '@penultimate', student_layer: features.0}}"],
     ["distill:", "fitnet", "@penultimate", "features.0", "bridge"]),
])
def test_bad_loss_input_is_one_line_before_the_run_dir(tmp_path, tiny_yaml, over, words):
    out = tmp_path / "run"
    line = one_line_error(run_cli("run", tiny_yaml, "--out", out, *over))
    for w in words:
        assert w in line, (w, line)
    assert not out.exists()


def snapshot(out, *dirs):
    """(bytes, mtime) of every file under ``dirs`` of the run."""
    return {str(f.relative_to(out)): (f.read_bytes(), f.stat().st_mtime_ns) for d in dirs for f in (out / d).rglob("*") if f.is_file()}


@pytest.mark.slow
def test_a_finished_run_grows_and_reuses_every_finished_stage(tmp_path, tiny_fashion, monkeypatch):
    base = dict(arms=["unpruned_teacher", "pruned_teacher"], optim={"epochs": 1, "batch_size": 64, "lr": 0.05})
    out = tmp_path / "run"
    original = load_config(write(tmp_path, tiny_config(tiny_fashion, distill={**base, "seeds": [0]})))
    run_pipeline(original, out)
    kept = ("teacher", "prune", "student", "distill/unpruned_teacher_seed0", "distill/pruned_teacher_seed0")
    before = snapshot(out, *kept)
    assert before
    config_before = (out / "config.yaml").read_bytes()

    # A growth that fails in training (here: the new seed's student) keeps the old config.yaml, so
    # the original command still takes the directory (it used to be refused as "a different config").
    grown = load_config(write(tmp_path, tiny_config(tiny_fashion, distill={**base, "seeds": [0, 1]}), "grown.yaml"))
    import ptd.pipeline.stages as pl  # distill_all's module: it calls stage_distill by that module's name

    real = pl.stage_distill

    def fails_on_seed1(ctx, arm, seed, *a, **k):
        if seed == 1:
            raise RuntimeError("diverged")
        return real(ctx, arm, seed, *a, **k)

    monkeypatch.setattr(pl, "stage_distill", fails_on_seed1)
    with pytest.raises(RuntimeError, match="diverged"):
        run_pipeline(grown, out)
    monkeypatch.undo()
    assert (out / "config.yaml").read_bytes() == config_before
    run_pipeline(original, out)  # resumes the finished run: nothing retrained
    assert snapshot(out, *kept) == before

    # More seeds: the same directory takes them; nothing finished is touched.
    r = run_pipeline(grown, out)
    assert snapshot(out, *kept) == before
    assert sorted((s["arm"], s["seed"]) for s in r["students"]) == [("pruned_teacher", 0), ("pruned_teacher", 1),
                                                                   ("unpruned_teacher", 0), ("unpruned_teacher", 1)]
    assert r["comparison"]["pruned_minus_unpruned"]["n"] == 2
    assert json.loads((out / "results.json").read_text())["summary"]["pruned_teacher"]["seeds"] == [0, 1]
    assert yaml.safe_load((out / "config.yaml").read_text())["distill"]["seeds"] == [0, 1]  # the grown config

    # Another loss, too: its students are added beside the first loss's.
    before = snapshot(out, *kept, "distill/pruned_teacher_seed1")
    more = tiny_config(tiny_fashion, distill={**base, "seeds": [0, 1], "loss": ["kd", "at"], "options": {"at": AT}})
    r = run_pipeline(load_config(write(tmp_path, more)), out)
    assert snapshot(out, *kept, "distill/pruned_teacher_seed1") == before
    assert (out / "distill" / "pruned_teacher-at_seed1" / "done").is_file() and list(r["losses"]) == ["kd", "at"]

    # A change to finished work is refused, naming the key, before anything is written.
    files = snapshot(out, ".")
    changed = tiny_config(tiny_fashion, distill={**base, "seeds": [0, 1], "loss": ["kd", "at"], "options": {"at": AT}})
    changed["teacher"]["optim"]["lr"] = 0.2
    with pytest.raises(RunDirError, match=r"teacher\.optim\.lr: 0\.05 there, 0\.2 now"):
        run_pipeline(load_config(write(tmp_path, changed)), out)
    fewer = tiny_config(tiny_fashion, distill={**base, "seeds": [0], "loss": ["kd", "at"], "options": {"at": AT}})
    with pytest.raises(RunDirError, match=r"distill\.seeds: \[0, 1\] there, \[0\] now"):
        run_pipeline(load_config(write(tmp_path, fewer)), out)
    reordered = tiny_config(tiny_fashion, distill={**base, "seeds": [0, 1], "loss": ["at", "kd"], "options": {"at": AT}})
    with pytest.raises(RunDirError, match=r"distill\.loss"):
        run_pipeline(load_config(write(tmp_path, reordered)), out)
    assert snapshot(out, ".") == files


@pytest.mark.slow
def test_teacher_replicates(tmp_path, tiny_fashion):
    cfg = tiny_config(tiny_fashion, distill={"arms": ["unpruned_teacher", "pruned_teacher"], "seeds": [0, 1],
                                             "optim": {"epochs": 1, "batch_size": 64, "lr": 0.05}})
    cfg["teacher"]["seeds"] = 2
    out = tmp_path / "run"
    r = run_pipeline(load_config(write(tmp_path, cfg)), out)
    # Replicate 0 keeps the one-teacher layout; replicate 1 has its own teacher, pruning and students.
    for d in ("teacher", "prune", "student", "distill/pruned_teacher_seed1", "teachers/r1/teacher", "teachers/r1/prune",
              "teachers/r1/distill/unpruned_teacher_seed0", "teachers/r1/distill/pruned_teacher_seed1"):
        assert (out / d / "done").is_file(), d
    assert not (out / "teachers" / "r1" / "student").exists()  # one student architecture: replicate 0's
    assert (out / "teacher" / "model.safetensors").read_bytes() != (out / "teachers" / "r1" / "teacher" / "model.safetensors").read_bytes()
    assert sorted((s["teacher"], s["arm"], s["seed"]) for s in r["students"]) == sorted(
        (t, a, sd) for t in (0, 1) for a in ("unpruned_teacher", "pruned_teacher") for sd in (0, 1))
    acc = {(s["teacher"], s["arm"], s["seed"]): s["test_acc"] for s in r["students"]}
    d = {t: [acc[(t, "pruned_teacher", sd)] - acc[(t, "unpruned_teacher", sd)] for sd in (0, 1)] for t in (0, 1)}
    c = r["comparison"]["pruned_minus_unpruned"]
    assert c["method"] == "teacher means, t" and c["n"] == 2 and c["teachers"] == 2 and c["students"] == 4
    assert c["mean"] == pytest.approx((sum(d[0]) / 2 + sum(d[1]) / 2) / 2)
    assert c["per_teacher"]["1"]["mean"] == pytest.approx(sum(d[1]) / 2) and c["per_teacher"]["1"]["n"] == 2
    assert [x["replicate"] for x in r["teacher_replicates"]] == [0, 1] and r["student_from_replicate"] == 0
    assert r["teacher_replicates"][1]["teacher_test_acc"] == json.loads((out / "teachers/r1/teacher/result.json").read_text())["test_acc"]
    md = (out / "report.md").read_text()
    assert "## Teacher replicates" in md and "replicate 0's pruned teacher" in md
    assert "| pruned minus unpruned | 1 |" in md and "| pruned minus unpruned | pooled" in md
    assert "Teacher replicates: per teacher and pooled" in (out / "report.html").read_text()


def test_teacher_seeds_must_be_positive_and_not_with_a_checkpoint(tmp_path, tiny_yaml):
    from ptd.config import ConfigError

    with pytest.raises(ConfigError, match=r"teacher\.seeds: 0 must be >= 1"):
        load_config(tiny_yaml, ["teacher.seeds=0"])
    with pytest.raises(ConfigError, match=r"teacher\.seeds: 2 needs trained teachers"):
        load_config(tiny_yaml, ["teacher.seeds=2", "teacher.checkpoint=/x.pt"])
    with pytest.raises(ConfigError, match=r"distill\.seeds: -1 each seed must be >= 0"):
        load_config(tiny_yaml, ["distill.seeds=[0, -1]"])
    with pytest.raises(ConfigError, match=r"^seed: -3 must be >= 0"):
        load_config(tiny_yaml, ["seed=-3"])
