"""``ptd compare RUN_A RUN_B``: two finished runs' students paired by arm, loss and seed, with the
report's statistics (B minus A, 95% paired-t interval, called only when it excludes 0). Built on
a committed demo run's results.json with the accuracies set by hand, so every figure can be
computed here from the formula."""
from __future__ import annotations

import copy
import json
import math
import statistics
from pathlib import Path

import pytest
from scipy import stats as sps

from ptd.cli import main
from ptd.report.compare import compare_runs

DEMO = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "fashion_mnist_demo" / "results.json"


def run_dir(tmp: Path, name: str, accs: dict[str, list[float]], loss=None, **top) -> Path:
    r = copy.deepcopy(json.loads(DEMO.read_text()))
    r["students"] = [{**r["students"][0], "arm": arm, "seed": s, "loss": loss, "test_acc": a}
                     for arm, xs in accs.items() for s, a in enumerate(xs)]
    r.update(top)
    d = tmp / name
    d.mkdir()
    (d / "results.json").write_text(json.dumps(r))
    return d


A = {"scratch": [0.8900, 0.8894, 0.8910, 0.8880, 0.8905], "pruned_teacher": [0.8921, 0.8930, 0.8915, 0.8940, 0.8925]}
D = [0.0010, 0.0020, 0.0030, 0.0020, 0.0025]  # B's KD students, minus A's, seed by seed


def test_the_difference_and_interval_are_the_paired_t_of_the_seeds(tmp_path, capsys):
    b = {"scratch": A["scratch"], "pruned_teacher": [x + d for x, d in zip(A["pruned_teacher"], D)]}
    ra, rb = run_dir(tmp_path, "a", A), run_dir(tmp_path, "b", b)
    assert main(["compare", str(ra), str(rb)]) == 0
    out = capsys.readouterr().out
    m = statistics.fmean(D)
    half = sps.t.ppf(0.975, len(D) - 1) * statistics.stdev(D) / math.sqrt(len(D))
    assert f"+{100 * m:.2f} points, 95% CI [+{100 * (m - half):.2f}, +{100 * (m + half):.2f}]" in out
    kd = next(l for l in out.splitlines() if l.startswith("| distilled from pruned teacher"))
    assert kd.endswith("| yes: B higher |") and "| 5 |" in kd
    alone = next(l for l in out.splitlines() if l.startswith("| student alone"))
    assert "+0.00 points" in alone and alone.endswith("| no |")  # identical students: an interval of no width, not a call
    rows = compare_runs(json.loads((ra / "results.json").read_text()), json.loads((rb / "results.json").read_text()))
    e = rows[1]["b_minus_a"]
    assert e["mean"] == pytest.approx(m, abs=1e-12) and e["ci_low"] == pytest.approx(m - half, abs=1e-12)
    assert e["ci_high"] == pytest.approx(m + half, abs=1e-12) and e["called"] and e["n"] == 5


def test_only_students_with_a_partner_are_paired(tmp_path, capsys):
    b = {"pruned_teacher": [x - 0.01 for x in A["pruned_teacher"][:3]], "unpruned_teacher": [0.88] * 3}
    rows = compare_runs(json.loads((run_dir(tmp_path, "a", A) / "results.json").read_text()),
                        json.loads((run_dir(tmp_path, "b", b) / "results.json").read_text()))
    assert [(r["arm"], r["n"]) for r in rows] == [("pruned_teacher", 3)]
    assert rows[0]["b_minus_a"]["mean"] == pytest.approx(-0.01) and rows[0]["b_minus_a"]["direction"] == 0  # sd 0: no call


def test_a_first_loss_named_or_not_pairs_the_same(tmp_path):
    # results from before losses were named per row (None) pair with results that name it
    ra = json.loads((run_dir(tmp_path, "a", A, loss=None, distill_losses=["kd"]) / "results.json").read_text())
    rb = json.loads((run_dir(tmp_path, "b", A, loss="kd", distill_losses=["kd"]) / "results.json").read_text())
    assert [r["n"] for r in compare_runs(ra, rb)] == [5, 5]



def test_scratch_students_pair_across_runs_whose_first_loss_differs(tmp_path):
    """A scratch student has no teacher and so no loss (its row's loss is None): it was keyed by the
    run's first loss, so A (loss: kd) and B (loss: at) did not pair their identical scratch students,
    and with nothing else shared compare_runs refused the two runs."""
    def results(name, loss):
        r = json.loads((run_dir(tmp_path, name, A, distill_losses=[loss]) / "results.json").read_text())
        r["students"] = [{**s, "loss": None if s["arm"] == "scratch" else loss} for s in r["students"]]
        return r

    ra, rb = results("a", "kd"), results("b", "at")
    # the scratch students pair; the KD students of two losses stay apart
    assert [(r["arm"], r["loss"], r["n"]) for r in compare_runs(ra, rb)] == [("scratch", None, 5)]
    # a scratch student listed twice is still refused
    twice = {**rb, "students": rb["students"] + [dict(rb["students"][0], test_acc=0.5)]}
    with pytest.raises(ValueError, match="arm scratch, seed 0 .* twice"):
        compare_runs(ra, twice)


def _refused(capsys, argv, *words) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err


def test_what_cannot_be_compared_is_one_line(tmp_path, capsys):
    ra = run_dir(tmp_path, "a", A)
    (tmp_path / "unfinished").mkdir()
    _refused(capsys, ["compare", str(ra), str(tmp_path / "unfinished")], "not a finished ptd run")
    _refused(capsys, ["compare", str(tmp_path / "missing"), str(ra)], "not a finished ptd run")
    # A stage folder of a run: that run named, as ptd report names it (one helper, missing_results).
    (ra / "config.yaml").write_text("name: a\n")
    (ra / "teacher").mkdir(exist_ok=True)
    _refused(capsys, ["compare", str(ra / "teacher"), str(ra)], f"is a folder inside the ptd run {ra.absolute()}, not a run")
    other = run_dir(tmp_path, "cifar", A, dataset="cifar10")
    _refused(capsys, ["compare", str(ra), str(other)], "different data", "same dataset")
    seeds = run_dir(tmp_path, "seeds", {"unpruned_teacher": [0.9]})
    _refused(capsys, ["compare", str(ra), str(seeds)], "no student of", "partner", "grow one run")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "results.json").write_text("{not json")
    _refused(capsys, ["compare", str(ra), str(bad)], str(bad / "results.json"))
    half = tmp_path / "half"
    half.mkdir()
    (half / "results.json").write_text(json.dumps({"name": "x"}))
    _refused(capsys, ["compare", str(ra), str(half)], "not a ptd results file")
    # The same run twice: a table of +0.00 [+0.00, +0.00] (new-user audit).
    _refused(capsys, ["compare", str(ra), str(ra) + "/"], "are the same run directory", "give two different runs")
    with pytest.raises(SystemExit) as e:  # a missing argument: argparse's one line
        main(["compare", str(ra)])
    assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_a_zero_width_interval_is_explained_not_called(tmp_path, capsys):
    ra, rb = run_dir(tmp_path, "a", A), run_dir(tmp_path, "b", {"scratch": [x + 0.001 for x in A["scratch"]]})
    assert main(["compare", str(ra), str(rb)]) == 0
    out = capsys.readouterr().out
    row = next(l for l in out.splitlines() if l.startswith("| student alone"))
    assert "+0.10 points, 95% CI [+0.10, +0.10]" in row and row.endswith("| no |")
    assert "An interval of no width" in out and "called only by the exact sign-flip test" in out


def test_several_teacher_replicates_are_estimated_over_the_teachers(tmp_path, capsys):
    """teacher.seeds > 1: the students of one teacher share its luck, so the interval is over
    the teachers' mean differences (n = teachers), as the report's."""
    def rows(accs_by_teacher):
        return [{"arm": "pruned_teacher", "seed": s, "teacher": t, "loss": None, "test_acc": a}
                for t, xs in enumerate(accs_by_teacher) for s, a in enumerate(xs)]
    base = [[0.80, 0.81, 0.82], [0.70, 0.71, 0.72], [0.75, 0.76, 0.77]]
    d = [[0.010, 0.012, 0.011], [-0.002, 0.000, 0.001], [0.004, 0.006, 0.005]]
    ra, rb = run_dir(tmp_path, "a", {}), run_dir(tmp_path, "b", {})
    for path, accs in ((ra, base), (rb, [[x + y for x, y in zip(bt, dt)] for bt, dt in zip(base, d)])):
        r = json.loads((path / "results.json").read_text())
        r["students"] = [{**json.loads(DEMO.read_text())["students"][0], **s} for s in rows(accs)]
        (path / "results.json").write_text(json.dumps(r))
    assert main(["compare", str(ra), str(rb)]) == 0
    out = capsys.readouterr().out
    means = [statistics.fmean(t) for t in d]
    m = statistics.fmean(means)
    half = sps.t.ppf(0.975, 2) * statistics.stdev(means) / math.sqrt(3)
    row = next(l for l in out.splitlines() if l.startswith("| distilled from pruned teacher"))
    assert "| 3 | 3 |" in row, row  # teachers, seeds
    assert f"{100 * m:+.2f} points, 95% CI [{100 * (m - half):+.2f}, {100 * (m + half):+.2f}] (teacher means, t, n=3)" in row
    assert "n counts teachers" in out


def test_a_student_listed_twice_is_a_damaged_file(tmp_path, capsys):
    ra = run_dir(tmp_path, "a", A)
    twice = run_dir(tmp_path, "twice", A)
    r = json.loads((twice / "results.json").read_text())
    r["students"].append(dict(r["students"][-1], test_acc=0.5))
    (twice / "results.json").write_text(json.dumps(r))
    _refused(capsys, ["compare", str(ra), str(twice)], str(twice / "results.json"), "twice", "damaged", "restore the file")
    # ptd report refuses it alike (it once rewrote it, duplicate kept, while compare's fix pointed at it)
    before = (twice / "results.json").read_bytes()
    _refused(capsys, ["report", str(twice)], str(twice / "results.json"), "twice", "damaged", f"ptd run CONFIG --out {twice}")
    assert (twice / "results.json").read_bytes() == before


def test_a_sweep_or_a_file_is_named_as_such(tmp_path, capsys):
    ra = run_dir(tmp_path, "a", A)
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "sweep.json").write_text("{}")
    _refused(capsys, ["compare", str(ra), str(sweep)], "is a sweep, not a run", "two run directories")
    _refused(capsys, ["compare", str(ra / "results.json"), str(ra)], "is a file, not a run directory")
    # ptd report on a file: it once said to run `ptd run CONFIG --out` that file
    _refused(capsys, ["report", str(ra / "results.json")], "is a file, not a run directory", "its --out")


@pytest.mark.parametrize("argv, words", [
    (["report", ""], ["ptd report: RUN_DIR is empty", "see ptd report --help"]),
    (["report"], ["ptd report: the following arguments are required: RUN_DIR"]),  # as --help names it (was run_dir)
    (["compare", "", "."], ["ptd compare: RUN_A is empty"]),
    (["compare", ".", " "], ["ptd compare: RUN_B is empty"]),
    (["export", ""], ["ptd export: RUN_DIR_OR_MODEL is empty"]),
    (["run", ""], ["ptd run: CONFIG is empty"]),
    (["eval", "", "c.yaml"], ["ptd eval: CHECKPOINT is empty"]),
    # argparse reports unknown arguments from the top parser: the hint named `ptd --help`
    (["sweep", "c.yaml", "--from", "x"], ["ptd sweep: unrecognized arguments: --from x", "see ptd sweep --help"]),
])
def test_empty_paths_and_unknown_flags_are_one_line_naming_the_command(capsys, argv, words):
    """An empty positional path was read as '.', this folder: `ptd report ''` re-rendered whatever run was here."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err


def test_runs_whose_teachers_differ_say_a_call_may_be_the_teachers(tmp_path, capsys):
    """The same config on a CPU and on an H100 gave teachers of 90.35% and 90.79%, and compare
    called the control row (-0.24 points) under "5% per row when the runs do not differ", while
    each row's interval covers the students' seed noise only (statistics audit)."""
    b = {"scratch": A["scratch"], "pruned_teacher": [x + d for x, d in zip(A["pruned_teacher"], D)]}
    ra = run_dir(tmp_path, "a", A)
    demo = json.loads(DEMO.read_text())
    rb = run_dir(tmp_path, "b", b, teacher={**demo["teacher"], "test_acc": demo["teacher"]["test_acc"] + 0.0044})
    assert main(["compare", str(ra), str(rb)]) == 0
    out = capsys.readouterr().out
    assert "(false-positive rate 5% per row when the runs' students differ by seed noise alone; that some one of these 2 rows " \
           "is called, up to 10%)." in out
    t = demo["teacher"]["test_acc"]
    assert (f"The runs' teachers differ (teacher {100 * t:.2f}% in A, {100 * (t + 0.0044):.2f}% in B): " in out
            and "a call there may be the teachers' difference" in out)
    rb3 = run_dir(tmp_path, "b3", b, pruned_teacher={**demo["pruned_teacher"], "test_acc": 0.5})
    assert main(["compare", str(ra), str(rb3)]) == 0  # only the pruned teachers differ: their accuracies are named
    assert f"The runs' pruned teachers differ (pruned teacher {100 * demo['pruned_teacher']['test_acc']:.2f}% in A, 50.00% in B)" \
        in capsys.readouterr().out
    rb2 = run_dir(tmp_path, "b2", b)
    assert main(["compare", str(ra), str(rb2)]) == 0
    assert "teachers differ" not in capsys.readouterr().out


def test_students_without_a_partner_are_named_by_side_arm_and_seed(tmp_path, capsys):
    """compare paired what it could and said nothing of the rest: a run grown from seeds [0, 1] to
    [0, 1, 2] against the original, or a run of 4 arms against one of 2 arms and 1 seed, read as if
    every student had been compared (new-user trial)."""
    small = {arm: xs[:2] for arm, xs in A.items()}
    ra, rb = run_dir(tmp_path, "a", small), run_dir(tmp_path, "b", {arm: xs[:3] for arm, xs in A.items()})
    assert main(["compare", str(ra), str(rb)]) == 0
    out = capsys.readouterr().out
    assert (f"in B ({rb}) with no partner in A: student alone (no teacher), seed 2; distilled from pruned teacher, seed 2. "
            in out), out
    assert "in A (" not in out
    four = {**A, "unpruned_teacher": [0.88] * 5, "retrained_teacher": [0.89] * 5}
    rc, rd = run_dir(tmp_path, "c", four), run_dir(tmp_path, "d", {arm: xs[:1] for arm, xs in A.items()})
    assert main(["compare", str(rc), str(rd)]) == 0
    out = capsys.readouterr().out
    assert (f"in A ({rc}) with no partner in B: student alone (no teacher), seeds 1, 2, 3, 4; distilled from unpruned teacher, "
            "seeds 0, 1, 2, 3, 4; distilled from pruned teacher, seeds 1, 2, 3, 4; distilled from unpruned teacher retrained as "
            "long (control), seeds 0, 1, 2, 3, 4. ") in out, out
    assert "with no partner in A" not in out
    assert main(["compare", str(ra), str(run_dir(tmp_path, "e", small))]) == 0  # every student paired: nothing to say
    assert "Left out of every row" not in capsys.readouterr().out


def test_the_config_keys_the_runs_differ_in_are_listed(tmp_path, capsys):
    """The point of a `--from` comparison is the change it tried, and compare never named it: the
    differing keys of the two config.yaml files, both values (name aside: it names the run)."""
    import yaml

    cfg = yaml.safe_load((DEMO.parent / "config.yaml").read_text())
    ra, rb = run_dir(tmp_path, "a", A), run_dir(tmp_path, "b", A)
    assert main(["compare", str(ra), str(rb)]) == 0  # results without their config: said, not guessed
    assert "Config: not compared, A and B have no readable config.yaml." in capsys.readouterr().out
    (ra / "config.yaml").write_text(yaml.safe_dump(cfg))
    other = {**cfg, "name": "other", "distill": {**cfg["distill"], "alpha": 0.5, "seeds": [0, 1, 2]}}
    other["student"] = {**cfg["student"], "round_to": 1}
    (rb / "config.yaml").write_text(yaml.safe_dump(other))
    assert main(["compare", str(ra), str(rb)]) == 0
    out = capsys.readouterr().out
    assert (f"Config keys that differ (A, then B): distill.alpha: {cfg['distill']['alpha']} in A, 0.5 in B; distill.seeds: "
            f"[0, 1] in A, [0, 1, 2] in B; student.round_to: {cfg['student']['round_to']} in A, 1 in B.") in out, out
    (rb / "config.yaml").write_text(yaml.safe_dump({**cfg, "name": "other"}))
    assert main(["compare", str(ra), str(rb)]) == 0
    assert "Config: the runs' config.yaml files differ in no key but name." in capsys.readouterr().out


COMMITTED = sorted(p.parent for p in DEMO.parents[1].glob("*/config.yaml"))


def _schema_keys(cfg=None, prefix: str = "") -> list[str]:
    """Every key of today's config, dotted: a section (a nested dataclass) gives its own keys."""
    import dataclasses

    from ptd.config import RunConfig

    cfg = RunConfig() if cfg is None else cfg
    out = []
    for f in dataclasses.fields(cfg):
        v, key = getattr(cfg, f.name), f"{prefix}{f.name}"
        out += _schema_keys(v, key + ".") if dataclasses.is_dataclass(v) else [key]
    return out


def _has(m: dict, key: str) -> bool:
    for part in key.split("."):
        if not isinstance(m, dict) or part not in m:
            return False
        m = m[part]
    return True


@pytest.mark.parametrize("run", COMMITTED, ids=lambda d: d.name)
def test_every_committed_run_reads_with_every_key_of_todays_config(run):
    """A committed run's config.yaml, read as `ptd compare` and `ptd report` read it and as a resume
    or --from reads it (keys added since filled in, ptd.config.ADDED_KEYS), holds every key of
    today's config: the oldest lacked seven (student.round_narrower, fast_wgrad, compile, jobs,
    prune.retrain_checkpoint, data.check_images, teacher.check_learned), which compare printed as
    "(not set)" and a resume read as None. A key added to the config without its old value in
    ADDED_KEYS fails here."""
    from ptd.io import read_yaml_mapping
    from ptd.pipeline.rundir import _recorded_paths
    from ptd.report import _recorded_config

    keys = _schema_keys()
    assert "fast_wgrad" in keys and "student.round_narrower" in keys  # the walk reaches top level and sections
    for read in (_recorded_config(run), _recorded_paths(run, read_yaml_mapping(run / "config.yaml"))):
        assert [k for k in keys if not _has(read, k)] == []


def test_compare_of_committed_runs_names_only_keys_they_differ_in():
    """Two committed runs compared: no key one of them only lacks for its age is "(not set)"; what
    is left "(not set)" is an option one run gave inside a free-form mapping (distill.options.at of
    the losses run). The demo against the EPYC re-run names exactly what they were run with apart."""
    import itertools

    from ptd.report.compare import MISSING, config_differences, config_line
    from ptd.report import _recorded_config

    free = ("distill.options.", "prune.options.", "distill.layer_map.", "teacher.model.kwargs.", "student.model.kwargs.")
    for a, b in itertools.combinations(COMMITTED, 2):
        unset = [k for k, va, vb in config_differences(_recorded_config(a), _recorded_config(b)) if MISSING in (va, vb)]
        assert [k for k in unset if not k.startswith(free)] == [], (a.name, b.name)
    demo, epyc = DEMO.parent, DEMO.parents[1] / "fashion_mnist_demo_epyc_s26"
    assert config_line(demo, epyc) == (
        "Config keys that differ (A, then B): prune.retrain_checkpoint: best in A, last in B; quiet: true in A, false in "
        "B; student.round_to: 8 in A, auto in B; teacher.check_learned: false in A, true in B; threads: 1 in A, null in B.")
