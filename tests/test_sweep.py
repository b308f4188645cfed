"""`ptd sweep`: a tiny sweep end to end (rows, IMP levels, plots, cost, resume), and its bad input."""
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import tiny_config
from ptd.cli import main
from ptd.config import ConfigError, load_config
from ptd.sweep import PrunedTeacher, check_sweep, strategy_options

PTD = [sys.executable, "-m", "ptd"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_cli(*args):
    return subprocess.run([*PTD, *map(str, args)], capture_output=True, text=True, timeout=300)


def one_line_error(r) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("ptd: error:"), r.stderr
    return lines[0]


def sweep_yaml(tmp_path: Path, data_root: Path, **sweep) -> Path:
    one = {"epochs": 1, "batch_size": 64, "lr": 0.05}
    cfg = tiny_config(data_root, threads=1,
                      teacher={"model": {"arch": "vgg", "kwargs": {"plan": [16, "M", 32, "M", 32]}}, "optim": one},
                      prune={"retrain": {**one, "lr": 0.02}},
                      distill={"seeds": [0, 1], "optim": one},
                      sweep={"sparsities": [0.36, 0.59], "strategies": ["imp", "oneshot"], **sweep})
    p = tmp_path / "sweep.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    width, height = struct.unpack(">II", data[16:24])  # IHDR, the first chunk
    assert width >= 300 and height >= 200 and len(data) > 10_000, (path, width, height, len(data))


@pytest.mark.slow
def test_sweep_end_to_end_and_resume(tmp_path, tiny_fashion, capsys):
    cfg_path = sweep_yaml(tmp_path, tiny_fashion)
    out = tmp_path / "run"
    assert main(["sweep", str(cfg_path), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "## Students" in printed and "| imp s0.59 |" in printed and "Same sparsity, different pruning" in printed

    r = json.loads((out / "sweep.json").read_text())
    assert json.loads((out / "env.json").read_text())["made_by"] == "sweep"  # preflight.run_kind reads it
    rows = {(x["strategy"], x["target_sparsity"]): x for x in r["rows"]}
    assert set(rows) == {(s, sp) for s in ("imp", "oneshot") for sp in (0.36, 0.59)}
    # IMP: one run to the highest sparsity; the sweep sparsities are its levels 2 and 4 (1 - 0.8^n).
    for sp, n in ((0.36, 2), (0.59, 4)):
        row = rows[("imp", sp)]
        assert row["level"] == n and row["prune_dir"] == "prune/imp"
        assert row["sparsity"] == pytest.approx(1 - 0.8 ** n, abs=1e-3)
        assert (out / "prune" / "imp" / f"level_{n}" / "model.safetensors").is_file()
    assert not (out / "prune" / "imp" / "level_5").exists()
    for sp in (0.36, 0.59):
        assert rows[("oneshot", sp)]["sparsity"] == pytest.approx(sp, abs=1e-3)
        assert (out / "prune" / f"oneshot_s{sp:g}" / "done").is_file()

    # Every teacher, plus scratch and the unpruned teacher, over both seeds; all one student.
    for x in r["rows"]:
        assert [s["seed"] for s in x["students"]] == [0, 1]
        assert all(0.0 <= s["test_acc"] <= 1.0 for s in x["students"])
        assert x["student_acc"]["n"] == 2 and x["vs_unpruned_teacher"]["n"] == 2
        assert 0.0 <= x["teacher_test_acc"] <= 1.0
    assert set(r["baselines"]) == {"scratch", "unpruned_teacher"}
    assert all(len(b["students"]) == 2 for b in r["baselines"].values())
    from ptd.train.checkpoint import read_metadata

    models = sorted((out / "distill").glob("*/model.safetensors"))
    assert len(models) == 2 * (4 + 2)
    assert len({read_metadata(m)["ptd_spec"] for m in models}) == 1  # the same student architecture everywhere
    assert r["student"]["derived_from"] == {"strategy": "imp", "sparsity": 0.59}

    # Cost: teacher + pruning (IMP levels cumulative) + the student's own training.
    t_ep = r["teacher"]["compute"]["epochs"]
    assert t_ep == 1
    imp_rows = sorted((x for x in r["rows"] if x["strategy"] == "imp"), key=lambda x: x["level"])
    for a, b in zip(imp_rows, imp_rows[1:]):
        for k in ("epochs", "steps", "wall_s"):
            assert b["compute"]["teacher_total"][k] > a["compute"]["teacher_total"][k], k
            assert b["compute"]["total_per_student"][k] > a["compute"]["total_per_student"][k], k
    for x in r["rows"]:
        c = x["compute"]
        assert c["pruning"]["epochs"] == (x["level"] if x["strategy"] == "imp" else 1)
        assert c["teacher_total"]["epochs"] == t_ep + c["pruning"]["epochs"]
        assert c["total_per_student"]["epochs"] == c["teacher_total"]["epochs"] + 1
    assert r["baselines"]["scratch"]["compute"]["total_per_student"]["epochs"] == 1
    assert r["baselines"]["unpruned_teacher"]["compute"]["total_per_student"]["epochs"] == t_ep + 1
    assert r["compute"]["sweep_total"]["epochs"] == t_ep + 4 + 2 + 2 * 6  # IMP's 4 levels once, 2 one-shot runs, 12 students

    # The chance check: the sweep records its test set, and sweep.md names exactly the models
    # whose accuracy is not above chance (tiny schedules: some are), or nothing.
    from ptd.report.sweep import sweep_not_learned

    assert r["test_set"]["n"] == 200 and r["test_set"]["num_classes"] == 10
    bad = sweep_not_learned(r)
    md = (out / "sweep.md").read_text()
    assert ((f"{len(bad)} models" if len(bad) > 1 else "1 model") + " did not learn" in md) if bad else ("did not learn" not in md)
    assert all(f"- {b['model']}: " in md for b in bad)

    for name in ("student_acc_vs_sparsity.png", "student_acc_vs_compute.png"):
        check_png(out / name)
        assert f"]({name})" in (out / "sweep.md").read_text()

    # Re-running the same command trains nothing and gives the same numbers.
    watched = [out / "distill" / "imp_s0.59_seed1" / "model.safetensors", out / "teacher" / "model.safetensors",
               out / "prune" / "imp" / "level_4" / "model.safetensors", out / "student" / "stats.json"]
    before = [p.stat().st_mtime_ns for p in watched]
    assert main(["sweep", str(cfg_path), "--out", str(out), "--quiet"]) == 0
    assert [p.stat().st_mtime_ns for p in watched] == before
    r2 = json.loads((out / "sweep.json").read_text())
    assert [x["students"] for x in r2["rows"]] == [x["students"] for x in r["rows"]]

    # A student/ that is not the sweep's (as `ptd run` into the same directory would leave) is refused.
    stats_path, arch_path = out / "student" / "stats.json", out / "student" / "architecture.json"
    stats = json.loads(stats_path.read_text())
    stats["spec"]["plan"][0] += 1
    stats_path.write_text(json.dumps(stats))
    # stats.json's spec alone edited: not the student architecture.json holds, damaged.
    line = one_line_error(run_cli("sweep", cfg_path, "--out", out, "--quiet"))
    assert line.startswith(f"ptd: error: {stats_path}: damaged (its student spec is not the one in architecture.json"), line
    arch_path.write_text(json.dumps(stats["spec"]))  # both: another student, as `ptd run` would have made
    # The students distilled into the old architecture are stale now (lineage, tests/test_lineage.py)...
    line = one_line_error(run_cli("sweep", cfg_path, "--out", out, "--quiet"))
    assert f"were made from {arch_path}, which has changed since" in line and "distill/imp_s0.59_seed1" in line
    # ...and without them, the student itself is refused as not the sweep's.
    import shutil

    shutil.rmtree(out / "distill")
    line = one_line_error(run_cli("sweep", cfg_path, "--out", out, "--quiet"))
    assert "not the sweep's" in line and "--out" in line


def test_unknown_strategy_is_one_line(tmp_path, tiny_fashion):
    cfg_path = sweep_yaml(tmp_path, tiny_fashion)
    out = tmp_path / "run"
    line = one_line_error(run_cli("sweep", cfg_path, "--out", out, "--set", "sweep.strategies=[imp,nope]"))
    assert "sweep.strategies" in line and "'nope'" in line
    for valid in ("imp", "gmp", "oneshot", "snip", "synflow", "random"):
        assert valid in line
    assert not out.exists()


def test_student_from_must_be_a_sweep_sparsity(tmp_path, tiny_fashion):
    cfg_path = sweep_yaml(tmp_path, tiny_fashion, student_from=0.5)
    line = one_line_error(run_cli("sweep", cfg_path, "--out", tmp_path / "run"))
    assert "sweep.student_from" in line and "0.36" in line and "0.59" in line
    assert not (tmp_path / "run").exists()


def test_options_per_strategy(tmp_path, tiny_fashion):
    base = load_config(sweep_yaml(tmp_path, tiny_fashion, strategies=["imp", "gmp"]))
    from dataclasses import replace

    keyed = replace(base, prune=replace(base.prune, options={"gmp": {"end_epoch": 1}}))
    assert strategy_options(keyed, "gmp") == {"end_epoch": 1} and strategy_options(keyed, "imp") == {}
    plain = replace(base, prune=replace(base.prune, options={"end_epoch": 1}))
    assert strategy_options(plain, "imp") == {"end_epoch": 1}  # applies to every strategy (imp would refuse it)
    mixed = replace(base, prune=replace(base.prune, options={"gmp": {"end_epoch": 1}, "rewind": "lr"}))
    with pytest.raises(ConfigError, match="mixes per-strategy"):
        check_sweep(mixed)
    dup = replace(base, sweep=replace(base.sweep, strategies=("imp", "imp")))
    with pytest.raises(ConfigError, match="twice"):
        check_sweep(dup)
    # a sparsity listed twice was run once, silently, where a strategy listed twice was refused
    twice = replace(base, sweep=replace(base.sweep, sparsities=(0.5, 0.5)))
    with pytest.raises(ConfigError, match="sweep.sparsities.*lists a sparsity twice"):
        check_sweep(twice)


def test_imp_level_cost_is_cumulative():
    levels = [{"level": 0, "epochs": 0, "steps": 0, "wall_s": 0.0}] + [
        {"level": k, "epochs": 2, "steps": 20, "wall_s": 1.5, "sparsity": 1 - 0.8 ** k} for k in range(1, 8)]
    res = {"levels": levels, "final_level": 7}
    costs = [PrunedTeacher("imp", 1 - 0.8 ** n, Path("prune/imp"), n, res).cost() for n in (2, 4, 7)]
    assert [c["epochs"] for c in costs] == [4, 8, 14]
    assert [c["steps"] for c in costs] == [40, 80, 140]
    assert costs[-1]["wall_s"] == pytest.approx(10.5)



def small_sweep(baselines: dict[str, list[float]], rows: dict[tuple[str, float], list[float]]) -> dict:
    """build_sweep_results on accuracies given by hand, seed by seed: {baseline arm: accuracies},
    {(strategy, sparsity): accuracies}; nothing trained."""
    from ptd.report.sweep import build_sweep_results

    def students(arm, accs):
        return [{"arm": arm, "seed": s, "test_acc": a, "val_acc": a, "epochs": 1, "steps": 1, "wall_s": 1.0}
                for s, a in enumerate(accs)]

    def teacher(strategy, sparsity):
        levels = [{"level": 0, "epochs": 0, "steps": 0, "wall_s": 0.0, "test_acc": 0.9},
                  {"level": 1, "epochs": 1, "steps": 1, "wall_s": 1.0, "sparsity": sparsity, "test_acc": 0.89}]
        return PrunedTeacher(strategy, sparsity, Path(f"run/prune/{strategy}_s{sparsity:g}"), 1, {"levels": levels, "final_level": 1})

    pruned = [(teacher(*k), students(f"{k[0]}_s{k[1]:g}", accs)) for k, accs in rows.items()]
    stats = {"spec": {"arch": "vgg"}, "teacher": {"params": 10, "flops": 100}, "student": {"params": 5, "flops": 50}}
    return build_sweep_results(load_config(), {"test_acc": 0.9, "epochs": 1, "steps": 1, "wall_s": 1.0}, stats, pruned[0][0],
                               {arm: students(arm, accs) for arm, accs in baselines.items()}, pruned)


def test_every_generated_label_names_its_two_arms():
    """Each comparison's verdict names the two arms compared (once it said "distilled from pruned teacher
    vs distilled from unpruned teacher" for every comparison, the baselines' vs_scratch included)."""
    from ptd.report import ARM_LABELS

    base = {"scratch": [0.5, 0.6], "unpruned_teacher": [0.7, 0.75]}
    r = small_sweep(base, {("imp", 0.2): [0.8, 0.76]})
    want = {
        ("rows", "vs_unpruned_teacher"): (ARM_LABELS["pruned_teacher"], ARM_LABELS["unpruned_teacher"], "+5.50 points"),  # (0.10 + 0.01) / 2
        ("rows", "vs_scratch"): (ARM_LABELS["pruned_teacher"], ARM_LABELS["scratch"], "+23.00 points"),
        ("unpruned_teacher", "vs_scratch"): (ARM_LABELS["unpruned_teacher"], ARM_LABELS["scratch"], "+17.50 points"),
    }
    got = {("rows", k): r["rows"][0][k]["verdict"] for k in ("vs_unpruned_teacher", "vs_scratch")}
    got[("unpruned_teacher", "vs_scratch")] = r["baselines"]["unpruned_teacher"]["vs_scratch"]["verdict"]
    assert r["baselines"]["scratch"]["vs_scratch"] is None
    for key, (a, b, pts) in want.items():
        # Two seeds: a 95% interval this wide includes zero, so no difference is called.
        assert got[key].startswith(f"no clear difference between {a} and {b}: {pts}, 95% CI ["), (key, got[key])
    assert {k: b["label"] for k, b in r["baselines"].items()} == {k: ARM_LABELS[k] for k in base}


def test_sweep_has_help():
    r = run_cli("sweep", "--help")
    assert r.returncode == 0 and "usage: ptd sweep" in r.stdout and "--out" in r.stdout and "--set" in r.stdout


def test_sweep_names_the_models_that_did_not_learn():
    from ptd.report.sweep import sweep_not_learned

    ts = {"n": 1000, "num_classes": 10, "chance": 0.1}
    r = {"teacher": {"test_acc": 0.9},
         "rows": [{"strategy": "imp", "target_sparsity": 0.59, "teacher_test_acc": 0.1,
                   "students": [{"seed": 0, "test_acc": 0.8}, {"seed": 1, "test_acc": 0.09}]}],
         "baselines": {"scratch": {"label": "student alone (no teacher)", "students": [{"seed": 0, "test_acc": 0.7}]}},
         "test_set": ts}
    assert [b["model"] for b in sweep_not_learned(r)] == ["imp teacher at sparsity 0.59", "distilled from the imp teacher at sparsity 0.59, seed 1"]
    assert sweep_not_learned({**r, "test_set": {}}) == []  # a sweep.json from before the check


def test_a_sweep_point_that_empties_a_layer_stops_the_sweep_in_one_line(tmp_path, tiny_fashion, capsys):
    """0.999 keeps 14 of the tiny teacher's 14,288 weights (enough for one per layer, so preflight
    lets it through); one-shot global magnitude then empties a layer. The sweep stops there with
    the collapse line; the point before it stays pruned on disk."""
    out = tmp_path / "run"
    p = sweep_yaml(tmp_path, tiny_fashion, sparsities=[0.36, 0.999], strategies=["oneshot"])
    capsys.readouterr()
    assert main(["sweep", str(p), "--out", str(out), "--quiet"]) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(err) == 1 and "layer collapse" in err[0] and f"add --teacher {out / 'teacher' / 'model.safetensors'}" in err[0], err
    assert (out / "prune" / "oneshot_s0.36" / "done").is_file() and not (out / "prune" / "oneshot_s0.999" / "done").exists()


def test_a_finished_student_keeps_the_multiple_auto_took_when_it_was_made(tmp_path, monkeypatch):
    """student.round_to: auto depends on the device and on ptd's measured candidates, neither in
    the config: a sweep resumed on a CPU after a GPU (or by a ptd whose candidates changed) must
    take its finished student as its own, not refuse it as 'made by ptd run'."""
    from types import SimpleNamespace

    import torch

    from ptd.models import build_model
    from ptd.pipeline import mark_done
    from ptd.pruning.masks import full_masks, prunable_weights
    from ptd.pruning.scores import magnitude
    from ptd.pruning.select import global_topk, keep_for_target
    from ptd.students import derive
    from ptd.sweep import RunDirError, check_student_dir

    torch.manual_seed(0)
    t = build_model("vgg", num_classes=10, in_channels=3, width=1.0, plan=[64, "M", 128, "M", 256])
    full = full_masks(prunable_weights(t))
    masks = global_topk(magnitude(t, full), full, keep_for_target(full, 0.59))
    student, plan = derive.derive_configured(t, masks, device_type="cuda")  # made on a GPU: 32
    assert plan.round_to == 32
    d = tmp_path / "student"
    d.mkdir()
    (d / "stats.json").write_text(json.dumps({"spec": student.ptd_spec, "plan": plan.to_dict()}))
    mark_done(d)
    cfg = SimpleNamespace(student=SimpleNamespace(source="derive", inherit=False, round_to="auto", round_narrower=True))
    src = PrunedTeacher("oneshot", 0.59, tmp_path, 1, {})
    cpu = SimpleNamespace(cfg=cfg, run_dir=tmp_path, rt=SimpleNamespace(device=torch.device("cpu")))
    assert derive.derive_configured(t, masks, device_type="cpu")[1].round_to == 8  # what auto takes here
    check_student_dir(cpu, src, t, masks)  # resumed on the CPU: the GPU's student is the sweep's
    monkeypatch.setattr(derive, "AUTO_ROUND_TO", {"cuda": (16, 8)})  # a later ptd with other candidates
    check_student_dir(SimpleNamespace(**{**vars(cpu), "rt": SimpleNamespace(device=torch.device("cuda"))}), src, t, masks)
    # A student the config would not make (another multiple given by number) is still refused.
    cfg.student.round_to = 8
    with pytest.raises(RunDirError, match="not the sweep's"):
        check_student_dir(cpu, src, t, masks)


def test_sweep_claims_over_all_rows_keep_their_false_positive_rate():
    """9 sweep rows, 5 seeds, no pruned teacher better than the unpruned one (every student drawn
    from one distribution; the rows share the baseline's students, as a sweep's do). Row by row,
    some row is called "better" in ~15% of sweeps; the whole-sweep calls the report adds (Holm's
    step-down, whose first step is the Bonferroni interval) keep any such call under 5%. And the
    report says both, with the rule each follows."""
    import numpy as np

    from ptd.report.stats import is_called
    from ptd.report.sweep import _vs, family_intervals

    rng = np.random.default_rng(0)
    n, per_row, family = 1000, 0, 0

    def draws(arm):
        return [{"arm": arm, "seed": s, "test_acc": float(0.9 + rng.normal(0, 0.01))} for s in range(5)]

    for _ in range(n):
        base = draws("unpruned_teacher")
        rows = [{"vs_unpruned_teacher": _vs(draws("pruned_teacher"), "pruned_teacher", base, "unpruned_teacher")} for _ in range(9)]
        family_intervals(rows, "vs_unpruned_teacher")
        vs = [r["vs_unpruned_teacher"] for r in rows]
        assert all(v["family"]["rows"] == 9 and v["family"]["level"] == pytest.approx(1 - 0.05 / 9) for v in vs)
        per_row += any(v["called"] and v["mean"] > 0 for v in vs)
        family += any(v["family"]["called"] and v["mean"] > 0 for v in vs)
        # Where nothing differs Holm calls something exactly when a Bonferroni interval excludes
        # zero (its first step): every call it makes here is one of those intervals' calls.
        bonferroni = [is_called(v["mean"], v["family"]["ci_low"], v["family"]["ci_high"], (), v["family"]["level"]) for v in vs]
        assert any(v["family"]["called"] for v in vs) == any(bonferroni)
    assert 0.10 <= per_row / n <= 0.21, per_row / n
    assert family / n <= 0.05, family / n


@pytest.mark.parametrize("real, sims, bonferroni, holm", [(3, 3000, (0.41, 0.48), (0.44, 0.52)), (9, 1000, (0.40, 0.50), (0.62, 0.72))])
def test_holm_calls_more_of_the_real_rows_and_keeps_any_false_call_under_five_percent(real, sims, bonferroni, holm):
    """The whole-sweep call is Holm's step-down (family_intervals), not Bonferroni's intervals
    alone: the same 5% bound on any false call, and more of the rows that really differ called.
    9 rows at 5 seeds; the first ``real`` rows' pruned teachers give students 3 student sds better
    (every student's accuracy sd 1 point, the rows sharing the baseline's students); measured
    through family_intervals at seed 7: with 3 real rows, each is called 44.6% of the time by
    Bonferroni's intervals and 48.1% by Holm, and some one of the 6 others falsely 2.9% and 3.8%;
    with all 9 real, 45.8% and 68.4%. Holm never calls fewer rows than Bonferroni (its first step
    is Bonferroni's interval), and calls something exactly when Bonferroni does: "some pruned
    teacher helped" is decided the same, how many did is what Holm finds more of (docs/sweep.md)."""
    import numpy as np

    from ptd.report.sweep import family_intervals

    rng = np.random.default_rng(7)
    effect = np.array([3.0] * real + [0.0] * (9 - real))
    acc = 0.9 + rng.normal(0, 0.01, size=(sims, 10, 5))  # [sim, baseline + 9 rows, seed]
    acc[:, 1:] += 0.01 * effect[None, :, None]
    false_calls, by_bonferroni, by_holm = 0, 0, 0
    for a in acc:
        rows = [{"vs": {"per_seed": {s: float(a[1 + i, s] - a[0, s]) for s in range(5)}}} for i in range(9)]
        family_intervals(rows, "vs")
        fam = [r["vs"]["family"] for r in rows]
        first = np.array([f["called_at"] == f["level"] for f in fam])  # called at the first step: Bonferroni's call
        called = np.array([f["called"] for f in fam])
        assert (called >= first).all() and called.any() == first.any()
        false_calls += called[real:].any()
        by_bonferroni += first[:real].sum()
        by_holm += called[:real].sum()
    per_row = (by_bonferroni / (real * sims), by_holm / (real * sims))
    assert bonferroni[0] <= per_row[0] <= bonferroni[1] and holm[0] <= per_row[1] <= holm[1], per_row
    assert per_row[1] - per_row[0] >= (0.015 if real < 9 else 0.15), per_row  # Holm's gain, paired on the same draws
    assert false_calls / sims <= 0.05, false_calls / sims


def test_a_family_interval_calls_by_the_rule_of_every_other_call_and_counts_a_teacher_once():
    """The family intervals had their own copy of the calling rule, without the sign-flip fallback
    for a zero-width interval: six seeds each +0.3 points were called row by row (p = 2/2^6) and
    not over a sweep of that one row, at the same 95%. And two sparsities on the same IMP level
    (the same students) counted twice in k (review)."""
    from ptd.report.sweep import _vs, family_intervals

    def students(arm, accs):
        return [{"arm": arm, "seed": s, "test_acc": a} for s, a in enumerate(accs)]

    base = students("unpruned_teacher", [0.80, 0.81, 0.79, 0.80, 0.80, 0.82])
    plus = students("pruned_teacher", [a + 0.003 for a in (0.80, 0.81, 0.79, 0.80, 0.80, 0.82)])
    rows = [{"prune_dir": "prune/imp", "level": 2, "vs_unpruned_teacher": _vs(plus, "pruned_teacher", base, "unpruned_teacher")}]
    family_intervals(rows, "vs_unpruned_teacher")
    c = rows[0]["vs_unpruned_teacher"]
    assert abs(c["ci_high"] - c["ci_low"]) < 1e-9 and c["called"] and c["sign_flip_p"] == 2 / 2 ** 6
    assert c["family"]["rows"] == 1 and c["family"]["called"]  # the same rule at the same level
    same = [{**r, "vs_unpruned_teacher": _vs(plus, "pruned_teacher", base, "unpruned_teacher")} for r in rows * 2]
    other = {"prune_dir": "prune/imp", "level": 3, "vs_unpruned_teacher": _vs(plus, "pruned_teacher", base, "unpruned_teacher")}
    family_intervals(same + [other], "vs_unpruned_teacher")
    assert [r["vs_unpruned_teacher"]["family"]["rows"] for r in same + [other]] == [2, 2, 2]
    assert not other["vs_unpruned_teacher"]["family"]["called"]  # 2/2^6 = 0.031 > 0.025: not at 97.5%


def test_sweep_reading_gives_the_whole_sweep_claim_and_the_row_by_row_one():
    from ptd.report.sweep import build_sweep_results, render_sweep_markdown

    def students(arm, accs):
        return [{"arm": arm, "seed": s, "test_acc": a, "val_acc": a, "epochs": 1, "steps": 1, "wall_s": 1.0}
                for s, a in enumerate(accs)]

    def point(target):
        levels = [{"level": 0, "epochs": 0, "steps": 0, "wall_s": 0.0, "test_acc": 0.9},
                  {"level": 1, "epochs": 1, "steps": 1, "wall_s": 1.0, "sparsity": target, "test_acc": 0.89}]
        return PrunedTeacher("imp", target, Path(f"run/prune/imp_{target}"), 1, {"levels": levels, "final_level": 1})

    base = {"unpruned_teacher": students("unpruned_teacher", [0.80, 0.81, 0.79, 0.80, 0.80])}
    # Points over the baseline, seed by seed: +2.0 but one +1.9, called by both rules. +0.5, 0.05,
    # 0.45, 0.3, 0.2: mean +0.30, sd 0.184; 95% half-width (t(0.975, 4) = 2.776) 0.228, called row
    # by row; at 98.33% (k = 3, t(1 - 0.05/6, 4) = 3.961) half-width 0.326, so its Bonferroni
    # interval includes zero, but once the first row is called Holm's next step is at 97.5% (m = 2,
    # t(0.9875, 4) = 3.495), half-width 0.287: called over the sweep. +0.3, -0.1, +0.4, +0.2, +0.1:
    # mean +0.18, sd 0.192, 95% half-width 0.239: neither (Holm's last step is the row's own 95%).
    rows = [(point(0.36), students("p", [0.82, 0.83, 0.81, 0.82, 0.819])),
            (point(0.59), students("p", [0.805, 0.8105, 0.7945, 0.803, 0.802])),
            (point(0.79), students("p", [0.803, 0.809, 0.794, 0.802, 0.801]))]
    stats = {"spec": {"arch": "vgg"}, "teacher": {"params": 10, "flops": 100}, "student": {"params": 5, "flops": 50}}
    r = build_sweep_results(load_config(), {"test_acc": 0.9, "epochs": 1, "steps": 1, "wall_s": 1.0}, stats, rows[0][0], base, rows)
    fam = [x["vs_unpruned_teacher"]["family"] for x in r["rows"]]
    assert [f["rows"] for f in fam] == [3, 3, 3] and fam[0]["level"] == pytest.approx(1 - 0.05 / 3)
    assert [f["called"] for f in fam] == [True, True, False]
    assert [f["called_at"] for f in fam] == [pytest.approx(1 - 0.05 / 3), pytest.approx(1 - 0.05 / 2), None]
    assert fam[1]["ci_low"] < 0 < fam[1]["ci_high"]  # the Bonferroni interval shown in sweep.json includes zero
    assert [x["vs_unpruned_teacher"]["called"] for x in r["rows"]] == [True, True, False]
    md = render_sweep_markdown(r, plots=False)
    # Each row's interval and both calls are in the table itself, not only in report.html (new-user audit).
    for x, calls in zip(r["rows"], ("yes / yes", "yes / yes", "no / no")):
        v = x["vs_unpruned_teacher"]
        assert f"| [{100 * v['ci_low']:+.2f}, {100 * v['ci_high']:+.2f}], {calls} |" in md, (calls, md)
    assert ("- Pruned teachers whose student beat the unpruned teacher's, over the whole sweep: 2 of 3 (imp s0.36, imp s0.59), by Holm's "
            "step-down for 3 comparisons: a row is called when its interval at 1 - 0.05/m excludes zero, m being the comparisons "
            "not called before it (first 98.33%, Bonferroni's level); the chance of any false call among them is at most 5%.") in md
    assert ("row by row (each row's own 95% CI above 0): 2 of 3 rows (imp s0.36, imp s0.59); where no pruned teacher helps, some "
            "one of 3 comparisons is called by chance up to 15% of the time (Bonferroni's bound") in md  # "far more than 5%" at any k
    # Two sparsities on one IMP level share their students and count once in k: the text said "3 of 2" (review).
    twin = PrunedTeacher("imp", 0.37, rows[0][0].prune_dir, 1, rows[0][0].prune_result)
    r4 = build_sweep_results(load_config(), {"test_acc": 0.9, "epochs": 1, "steps": 1, "wall_s": 1.0}, stats, rows[0][0], base,
                             rows + [(twin, rows[0][1])])
    assert [x["vs_unpruned_teacher"]["family"]["rows"] for x in r4["rows"]] == [3, 3, 3, 3]
    md4 = render_sweep_markdown(r4, plots=False)
    assert ("over the whole sweep: 2 of 3 (rows on one IMP level share their students and count once) (imp s0.36, imp s0.59, imp s0.37), "
            "by Holm's step-down for 3 comparisons") in md4, md4
    assert "row by row (each row's own 95% CI above 0): 3 of 4 rows (imp s0.36, imp s0.59, imp s0.37)" in md4
    # Two seeds: the rows are still called by their intervals, so the reading must not say "no claim is made".
    two = {**r, "seeds": [0, 1]}
    md2 = render_sweep_markdown(two, plots=False)
    assert "no claim is made" not in md2 and "- Only 2 seeds: each interval above has 1 degree of freedom (t = 12.7)" in md2
    # ... and the whole-sweep column, at 1 degree of freedom and 1 - 0.05/3 (t_{0.99167, 1} = 38.2), calls almost nothing.
    assert "(t = 12.7), and the whole-sweep calls (Holm) start at intervals with t = 38.2, so they call almost nothing; only a large" in md2, md2
    assert "(the highest of 3 means: picked for being high" in md


def test_sweep_md_says_which_weights_its_accuracies_are_and_a_loaded_teachers_uncounted_compute():
    """sweep.md said "at the best-validation epoch" for every model, while pruning levels end on
    prune.retrain_checkpoint's (last by default), and a teacher loaded from a file counted 0 compute
    without a word (the run report's fix, for sweeps)."""
    from ptd.config import load_config as load
    from ptd.report.sweep import build_sweep_results, render_sweep_markdown

    levels = [{"level": 0, "epochs": 0, "steps": 0, "wall_s": 0.0, "test_acc": 0.9},
              {"level": 1, "epochs": 1, "steps": 1, "wall_s": 1.0, "sparsity": 0.36, "test_acc": 0.89}]
    pt = PrunedTeacher("imp", 0.36, Path("run/prune/imp_0.36"), 1, {"levels": levels, "final_level": 1})
    st = [{"arm": "p", "seed": s, "test_acc": 0.8, "val_acc": 0.8, "epochs": 1, "steps": 1, "wall_s": 1.0} for s in (0, 1)]
    base = {"unpruned_teacher": [{**x, "arm": "unpruned_teacher"} for x in st]}
    stats = {"spec": {"arch": "vgg"}, "teacher": {"params": 10, "flops": 100}, "student": {"params": 5, "flops": 50}}
    trained = {"test_acc": 0.9, "epochs": 1, "steps": 1, "wall_s": 1.0}
    md = render_sweep_markdown(build_sweep_results(load(), trained, stats, pt, base, [(pt, st)]), plots=False)
    assert ("Accuracies are test top-1 (%): the teacher and the students at their best-validation epoch; the pruned teachers "
            "at their last epoch (prune.retrain_checkpoint: last).") in md
    loaded = {**trained, "epochs": 0, "steps": 0, "wall_s": 0.0, "source": "/models/t.safetensors"}
    md = render_sweep_markdown(build_sweep_results(load(None, ["prune.retrain_checkpoint=best"]), loaded, stats, pt, base,
                                                   [(pt, st)]), plots=False)
    assert ("loaded from /models/t.safetensors, not trained in this sweep: its training is in no compute column, so every "
            "total behind a distilled student is a lower bound.") in md
    assert ("Accuracies are test top-1 (%): the teacher as loaded from /models/t.safetensors (not trained in this sweep); "
            "the pruned teachers and the students at their best-validation epoch (prune.retrain_checkpoint: best).") in md
    r = build_sweep_results(load(None, ["data.val_fraction=0"]), trained, stats, pt, base, [(pt, st)])
    assert ("Accuracies are test top-1 (%): the teacher, the pruned teachers and the students at their last epoch "
            "(the sweep has no validation set).") in render_sweep_markdown(r, plots=False)
    # A sweep.json from before prune.retrain_checkpoint was recorded: no claim on the pruned teachers.
    old = {**r, "schedules": {k: v for k, v in r["schedules"].items() if k not in ("retrain_checkpoint", "validation")}}
    assert ("Accuracies are test top-1 (%): the teacher and the students at their best-validation epoch; the pruned "
            "teachers at an epoch this sweep did not record (it predates prune.retrain_checkpoint).") in render_sweep_markdown(old, plots=False)


def test_ptd_report_recomputes_a_sweeps_statistics_as_the_sweep_wrote_them(tmp_path, monkeypatch, capsys):
    """The sweep writes its statistics (build_sweep_results) and `ptd report` recomputes them from
    sweep.json's per-seed rows; they were computed in two places that had to agree. Both now go
    through ptd.report.sweep.sweep_statistics, and a report on a sweep with its statistics removed
    writes back what the sweep wrote."""
    import ptd.report.sweep as rs

    calls, one = [], rs.sweep_statistics

    def counted(rows, baselines):
        calls.append(len(rows))
        one(rows, baselines)

    monkeypatch.setattr(rs, "sweep_statistics", counted)
    r = small_sweep({"scratch": [0.50, 0.60, 0.55], "unpruned_teacher": [0.70, 0.75, 0.72]},
                    {("imp", 0.2): [0.80, 0.76, 0.78], ("oneshot", 0.5): [0.71, 0.77, 0.70]})
    assert calls == [2]
    assert r["rows"][0]["vs_unpruned_teacher"]["family"]["rows"] == 2 and r["baselines"]["unpruned_teacher"]["vs_scratch"]
    stripped = json.loads(json.dumps(r))
    for x in [*stripped["rows"], *stripped["baselines"].values()]:
        for key in ("student_acc", "vs_unpruned_teacher", "vs_scratch"):
            x.pop(key, None)
    d = tmp_path / "sweep"
    d.mkdir()
    (d / "sweep.json").write_text(json.dumps(stripped))
    assert main(["report", str(d)]) == 0
    assert calls == [2, 2]
    assert json.loads((d / "sweep.json").read_text()) == json.loads(json.dumps(r))


def test_the_command_that_made_a_directory_is_recorded_and_decides_its_kind(tmp_path):
    """By layout alone, a run whose user left a backup folder named prune/imp was taken for a sweep,
    and a sweep of a strategy no longer registered was not recognised (review). env.json now
    records which command opened the directory in each session; where one kind alone did and it
    wrote past the shared stages, that decides. Older directories and a teacher-only directory
    that both commands grew are read by layout, as before."""
    import json

    from ptd.preflight import run_kind

    def made(out, *kinds, old=False):
        out.mkdir(parents=True, exist_ok=True)
        sessions = [{"command": "x"} if old else {"made_by": k} for k in kinds]
        (out / "env.json").write_text(json.dumps({**sessions[0], "resumed": sessions[1:]}))
        return out

    run = made(tmp_path / "run", "run", "run")
    (run / "prune" / "imp").mkdir(parents=True)  # a user's folder named like a strategy
    assert run_kind(run) == "run"
    sweep = made(tmp_path / "sweep", "sweep")
    (sweep / "prune" / "my_plugin_strategy").mkdir(parents=True)  # its plugin no longer registered
    assert run_kind(sweep) == "sweep"
    (sweep / "prune" / "my_plugin_strategy").rmdir()
    assert run_kind(sweep) is None  # only shared stages so far: either may grow it
    both = made(tmp_path / "both", "run", "sweep")  # a teacher-only run a sweep grew: by layout
    (both / "prune" / "imp").mkdir(parents=True)
    assert run_kind(both) == "sweep"
    old = made(tmp_path / "old", "run", old=True)  # before the record: by layout
    (old / "prune" / "imp").mkdir(parents=True)
    assert run_kind(old) == "sweep"
    (old / "env.json").write_text("{damaged")
    assert run_kind(old) == "sweep"


@pytest.mark.parametrize("marker,kind", [("results.json", "run"), ("prune/level_1/", "run"), ("prune/done", "run"),
                                         ("control/", "run"), ("teachers/r1/", "run"), ("distill/pruned_teacher_seed0/", "run"),
                                         ("sweep.json", "sweep"), ("prune/imp/", "sweep"), ("prune/gmp_s0.36/", "sweep")])
def test_a_sweep_and_a_run_do_not_go_into_each_others_directory(tmp_path, tiny_fashion, capsys, marker, kind):
    """They share teacher/, student/ and the report's names but nothing else: a sweep into a
    finished run trained every pruning level before it found the run's student and refused (the
    run's env.json rewritten, prune/ added to), and a run into a sweep replaced the sweep's
    report.html (bad-input audit). Refused up front, nothing written; a directory holding only a
    teacher (or a student, or the arms both share) may be grown by either."""
    from ptd.cli import main

    y = sweep_yaml(tmp_path, tiny_fashion)
    out = tmp_path / "out"
    (out / "teacher").mkdir(parents=True)
    (out / "config.yaml").write_text("x")
    (out / "distill" / "scratch_seed0").mkdir(parents=True)
    m = out / marker
    m.mkdir(parents=True) if marker.endswith("/") else (m.parent.mkdir(parents=True, exist_ok=True), m.write_text("{}"))
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    other = "sweep" if kind == "run" else "run"
    assert main([other, str(y), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"ptd: error: run directory {out} holds a {kind}, made by "
                   f"{'ptd sweep' if kind == 'sweep' else 'ptd run (or ptd train/prune/student/distill)'}; a {other} cannot go "
                   f"into it: pass --out a new directory"], err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before
    from ptd.preflight import run_kind
    assert run_kind(out) == kind
    m.unlink() if m.is_file() else m.rmdir()
    if m.parent != out and not any(m.parent.iterdir()) and m.parent.name != "distill":
        m.parent.rmdir()  # teachers/ without its r1/
    assert run_kind(out) is None  # teacher/, config.yaml and the shared scratch arm: either command may take it
    (out / "prune" / "level_3.bak").mkdir(parents=True)  # a folder a user left there names neither
    assert run_kind(out) is None


def test_sweep_reading_gives_the_baselines_interval_and_says_when_the_student_alone_beat_every_teacher():
    """sweep.md's reading gave "distilled from the unpruned teacher vs the student alone: -14.09 (0/2)
    points" with no interval (95% CI [-71.07, +42.90], not called), and named a distilled student
    "Best mean student" while the student alone scored 14 points above every one (new-user trial)."""
    from ptd.report.sweep import build_sweep_results, render_sweep_markdown

    def students(arm, accs):
        return [{"arm": arm, "seed": s, "test_acc": a, "val_acc": a, "epochs": 1, "steps": 1, "wall_s": 1.0}
                for s, a in enumerate(accs)]

    levels = [{"level": 0, "epochs": 0, "steps": 0, "wall_s": 0.0, "test_acc": 0.9},
              {"level": 1, "epochs": 1, "steps": 1, "wall_s": 1.0, "sparsity": 0.36, "test_acc": 0.89}]
    pt = PrunedTeacher("imp", 0.36, Path("run/prune/imp_0.36"), 1, {"levels": levels, "final_level": 1})
    stats = {"spec": {"arch": "vgg"}, "teacher": {"params": 10, "flops": 100}, "student": {"params": 5, "flops": 50}}
    trained = {"test_acc": 0.9, "epochs": 1, "steps": 1, "wall_s": 1.0}
    # Alone minus unpruned KD per seed: +0.10, +0.09, +0.08: mean +9.00 points, sd 1.0, 95% half-width
    # t(0.975, 2) 4.303 x 1.0 / sqrt(3) = 2.48 points: [+6.52, +11.48] the other way round, called.
    base = {"unpruned_teacher": students("unpruned_teacher", [0.70, 0.72, 0.71]), "scratch": students("scratch", [0.80, 0.81, 0.79])}
    md = render_sweep_markdown(build_sweep_results(load_config(), trained, stats, pt, base,
                                                   [(pt, students("p", [0.71, 0.73, 0.70]))]), plots=False)
    assert "- distilled from the unpruned teacher vs the student alone: -9.00 (0/3) points (wins/seeds), 95% CI [-11.48, -6.52], called." in md, md
    assert "- The student alone (no teacher) scored 80.00 ± 1.00 %, above every distilled student's mean (by means, not a call)" in md
    base["scratch"] = students("scratch", [0.60, 0.61, 0.59])  # below them: no such line
    md = render_sweep_markdown(build_sweep_results(load_config(), trained, stats, pt, base,
                                                   [(pt, students("p", [0.71, 0.73, 0.70]))]), plots=False)
    assert "above every distilled student's mean" not in md and "95% CI [+8.52, +13.48], called." in md, md
