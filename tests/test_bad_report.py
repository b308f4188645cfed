"""`ptd report` on files it cannot report on, and into folders it cannot write: exit 2, exactly one
line ``ptd: error: ...`` naming the file and key (or the path) and the fix, no traceback, and no
file of the run changed. results.json / sweep.json are checked whole before anything is drawn,
every output is rendered before the first is written, and each is written atomically.

Most cases call ``ptd.cli.main`` in-process on a run folder that holds only results.json (and
sweep.json): a refused file fails before any drawing, so they take milliseconds.
"""
from __future__ import annotations

import copy
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ptd.cli import main
from ptd.report import RESULTS_SCHEMA, build_results, validate
from ptd.report.sweep import PLOTS, SWEEP_SCHEMA

from conftest import tiny_config

DATA = Path(__file__).parent / "data"
RESULTS = json.loads((DATA / "demo_run" / "results.json").read_text())
SWEEP = json.loads((DATA / "demo_sweep" / "sweep.json").read_text())
OLD = "the report from before\n"


def snapshot(d: Path) -> dict[str, str]:
    """Every file and folder under ``d``, with the sha256 of each file."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(d.rglob("*"))}


def run_folder(tmp_path: Path, results: object, name: str = "run") -> Path:
    """A finished run as `ptd report` sees it: results.json and the reports of an earlier render."""
    d = tmp_path / name
    d.mkdir()
    (d / "results.json").write_text(results if isinstance(results, str) else json.dumps(results))
    (d / "report.md").write_text(OLD)
    (d / "report.html").write_text(OLD)
    return d


def sweep_folder(tmp_path: Path, sweep: object) -> Path:
    d = tmp_path / "sweep"
    d.mkdir()
    (d / "sweep.json").write_text(json.dumps(sweep))
    (d / "sweep.md").write_text(OLD)
    return d


def refused(capsys, d: Path) -> str:
    """Run `ptd report d`, expect the one-line refusal, and return that line."""
    before = snapshot(d)
    rc = main(["report", str(d)])
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    assert len(err.splitlines()) == 1 and err.startswith("ptd: error: ") and "Traceback" not in err, err
    assert snapshot(d) == before, "a refused report changed the run's files"
    return err.strip()


def _edit(**changes):
    """results.json with each dotted key set (or removed, for ``DROP``)."""
    r = copy.deepcopy(RESULTS)
    for dotted, v in changes.items():
        *path, last = dotted.split("__")
        node = r
        for k in path:
            node = node[int(k)] if isinstance(node, list) else node[k]
        if v is DROP:
            del node[last]
        else:
            node[int(last) if isinstance(node, list) else last] = v
    return r


DROP = object()

# (id, results.json, the key the message must name)
BAD_RESULTS = [
    ("no_teacher", _edit(teacher=DROP), '"teacher" is missing'),
    ("no_student", _edit(student=DROP), '"student" is missing'),
    ("only_students", {"students": []}, '"name" is missing'),
    ("students_empty", _edit(students=[]), '"students" is an empty list'),
    ("acc_nan", _edit(students__0__test_acc=float("nan")), '"students[0].test_acc" is NaN, not a finite number'),
    ("acc_null", _edit(students__3__test_acc=None), '"students[3].test_acc" is null, not a number'),
    ("acc_over_1", _edit(students__1__test_acc=1.5), '"students[1].test_acc" is 1.5, not in 0..1'),
    ("teacher_acc_str", _edit(teacher__test_acc="ninety"), '"teacher.test_acc" is "ninety", not a number'),
    ("teacher_acc_inf", _edit(teacher__test_acc=float("inf")), '"teacher.test_acc" is Infinity, not a finite number'),
    ("unknown_arm", _edit(students__0__arm="bogus"), '"students[0].arm" is "bogus", not one of scratch'),
    ("params_bool", _edit(teacher__params=True), '"teacher.params" is true, not an integer'),
    ("params_huge", _edit(student__params=10 ** 400), '"student.params" is 1000'),
    ("levels_empty", _edit(pruned_teacher__levels=[]), '"pruned_teacher.levels" is an empty list'),
    ("latency_key", _edit(teacher__latency={"one": {"median_ms": 1.0}}), '"teacher.latency.one" is not a batch size'),
    ("onnx_zero", _edit(student__onnx_latency={"batch_1": {"teacher_ms": 1.0, "student_ms": 0}}),
     '"student.onnx_latency.batch_1.student_ms" is 0, not a time > 0'),
    ("compute_arm", _edit(compute__students__bogus={"epochs": 1, "steps": 1, "wall_s": 1}), '"compute.students.bogus" is "bogus"'),
    ("compute_missing", _edit(compute__total_per_student=DROP), '"compute.total_per_student" is missing'),
    ("test_set_str", _edit(test_set={"n": "200", "chance": 0.1}), '"test_set.n" is "200", not an integer'),
    ("top_level_list", [1, 2], "the top level is [1, 2], not an object"),
]


@pytest.mark.parametrize("results,key", [c[1:] for c in BAD_RESULTS], ids=[c[0] for c in BAD_RESULTS])
def test_results_json_that_ptd_did_not_write_is_refused_naming_the_key(tmp_path, capsys, results, key):
    d = run_folder(tmp_path, results)
    err = refused(capsys, d)
    assert err.startswith(f"ptd: error: {d / 'results.json'} is not a ptd results file ("), err
    assert key in err, err
    assert err.endswith(f"re-run `ptd run CONFIG --out {d}` to regenerate it, or restore the file"), err


def test_results_json_that_is_not_json_is_refused(tmp_path, capsys):
    d = run_folder(tmp_path, '{"students": [{"arm": "scr')
    assert "is not a ptd results file (JSONDecodeError: Unterminated string" in refused(capsys, d)
    d = run_folder(tmp_path, "[" * 100_000 + "]" * 100_000, "deep")
    assert "is not a ptd results file (RecursionError" in refused(capsys, d)


def _sweep(**changes):
    r = copy.deepcopy(SWEEP)
    for k, v in changes.items():
        if v is DROP:
            del r[k]
        else:
            r[k] = v
    return r


def _bad_row_acc():
    r = copy.deepcopy(SWEEP)
    r["rows"][1]["students"][2]["test_acc"] = float("nan")
    return r


BAD_SWEEPS = [
    ("audit_sw1", {"baselines": {}, "rows": []}, '"name" is missing'),
    ("rows_empty", _sweep(rows=[]), '"rows" is an empty list'),
    ("seeds_empty", _sweep(seeds=[]), '"seeds" is an empty list'),
    ("no_student", _sweep(student=DROP), '"student" is missing'),
    ("row_acc_nan", _bad_row_acc(), '"rows[1].students[2].test_acc" is NaN'),
    ("row_students_int", _sweep(rows=[{**SWEEP["rows"][0], "students": 5}]), '"rows[0].students" is 5, not a list'),
    ("baseline_arm", _sweep(baselines={"bogus": SWEEP["baselines"]["scratch"]}), '"baselines.bogus" is "bogus"'),
]


@pytest.mark.parametrize("sweep,key", [c[1:] for c in BAD_SWEEPS], ids=[c[0] for c in BAD_SWEEPS])
def test_sweep_json_that_ptd_did_not_write_is_refused_naming_the_key(tmp_path, capsys, sweep, key):
    d = sweep_folder(tmp_path, sweep)
    err = refused(capsys, d)
    assert err.startswith(f"ptd: error: {d / 'sweep.json'} is not a ptd sweep file ("), err
    assert key in err and err.endswith(f"re-run `ptd sweep CONFIG --out {d}` to regenerate it, or restore the file"), err
    assert not any((d / p).exists() for p in PLOTS)


@pytest.mark.parametrize("name", ["report.md", "report.html"])
def test_a_folder_where_a_run_report_goes_is_refused_before_any_write(tmp_path, capsys, name):
    d = run_folder(tmp_path, RESULTS)
    (d / name).unlink()
    (d / name).mkdir()
    err = refused(capsys, d)  # results.json too is left as it was, though it is written first
    assert err == (f"ptd: error: cannot write {d / name}: a folder is in the way (the report writes a file there); "
                   "move or rename that folder, then run the command again")


@pytest.mark.parametrize("name", ["report.html", PLOTS[1]])
def test_a_folder_where_a_sweep_report_goes_is_refused_before_any_write(tmp_path, capsys, name):
    d = sweep_folder(tmp_path, SWEEP)
    (d / name).mkdir()
    assert f"cannot write {d / name}: a folder is in the way" in refused(capsys, d)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("setpriv"), reason="root ignores permissions; setpriv drops that")
def test_a_read_only_run_folder_is_refused_before_any_write(tmp_path):
    d = run_folder(tmp_path, RESULTS)
    before = snapshot(d)
    os.chmod(d, 0o555)
    try:
        # As root, drop the capability that ignores file permissions, as a normal user has none.
        wrap = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
        r = subprocess.run(wrap + [sys.executable, "-m", "ptd", "report", str(d)], capture_output=True, text=True, timeout=120)
    finally:
        os.chmod(d, 0o755)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith(f"ptd: error: cannot write {d / 'results.json'}: this user cannot write to {d} "), r.stderr
    assert f"chmod u+w {d}" in r.stderr
    assert snapshot(d) == before


def test_a_write_that_fails_midway_leaves_every_file_whole(tmp_path, capsys, monkeypatch):
    """Disk full at report.md: one line naming it; results.json is whole (written first, atomically),
    report.md and report.html are the old ones, and no temporary file is left behind."""
    import ptd.report.html as page
    from ptd.train import checkpoint as ckpt

    d = run_folder(tmp_path, RESULTS)
    monkeypatch.setattr(page, "render_run_html", lambda run_dir, results=None: "<html>new</html>")  # drawing is not the point here
    replace = os.replace

    def full_disk(src, dst):
        if Path(dst).name == "report.md":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        replace(src, dst)
    monkeypatch.setattr(ckpt.os, "replace", full_disk)
    rc = main(["report", str(d)])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.strip() == (f"ptd: error: cannot write {d / 'report.md'}: No space left on device; free space on that disk, "
                           "then run the command again")
    assert json.loads((d / "results.json").read_text())["students"] == RESULTS["students"]
    assert (d / "report.md").read_text() == OLD and (d / "report.html").read_text() == OLD
    assert sorted(p.name for p in d.iterdir()) == ["report.html", "report.md", "results.json"]


def test_what_ptd_writes_passes_the_check(tmp_path):
    """The check refuses only what ptd never writes: the committed demo run (from before several
    later keys) and sweep, and build_results with every optional part (teacher replicates,
    several losses, the control, onnxruntime and GPU timings with an out-of-memory batch)."""
    validate(RESULTS_SCHEMA, RESULTS, Path("results.json"), "")
    validate(SWEEP_SCHEMA, SWEEP, Path("sweep.json"), "")
    from ptd.config import RunConfig, from_dict

    cfg = from_dict(RunConfig, tiny_config(tmp_path, distill={"loss": ["kd", "rkd"], "seeds": [0, 1]}))
    cost = {"epochs": 2, "steps": 10, "wall_s": 1.5}
    lat = {"1": {"median_ms": 0.3, "batch_size": 1}, "64": {"median_ms": 2.0, "batch_size": 64}}
    teacher = {"test_acc": 0.9, "val_acc": 0.88, **cost}
    prune = {"strategy": "imp", "final_level": 2, "sparsity": 0.36, **cost,
             "levels": [{"level": 0, "sparsity": 0.0, "val_acc": 0.88, "test_acc": 0.9, "epochs": 0, "params_nonzero": 1000},
                        {"level": 2, "sparsity": 0.36, "val_acc": None, "test_acc": 0.89, "epochs": None, "params_nonzero": 640}]}
    stats = {"spec": {"arch": "vgg"}, "teacher": {"params": 1000, "flops": 5000, "latency": lat},
             "student": {"params": 400, "flops": 2000, "latency": lat},
             "onnx_latency": {"runtime": "onnxruntime CPU", "threads": 1, "batch_1": {"teacher_ms": 0.1, "student_ms": 0.05, "speedup": 2.0},
                              "batch_64": {"student_ms": 1.0}},
             "cuda_latency": {"gpu": "H100", "batch_1": {"teacher_ms": 0.1, "student_ms": 0.1, "speedup": 1.0},
                              "batch_256": {"error": "out of GPU memory"}}}
    students = [{"arm": arm, "seed": s, "loss": loss, "test_acc": 0.8 + 0.01 * s, "val_acc": 0.8, "teacher": t, **cost}
                for t in (0, 1) for s in (0, 1)
                for arm, loss in (("scratch", None), ("pruned_teacher", "kd"), ("pruned_teacher", "rkd"),
                                  ("retrained_teacher", "kd"), ("retrained_teacher", "rkd"))]
    reps = [{"replicate": k, "teacher": teacher, "prune": prune, "control": {"test_acc": 0.91, "epochs": 2}} for k in (0, 1)]
    r = build_results(cfg, teacher, prune, stats, students, control={"test_acc": 0.91, "val_acc": None, **cost}, replicates=reps,
                      test_set={"n": 200, "num_classes": 10, "chance": 0.1})
    assert r["losses"] and r["teacher_replicates"] and r["retrained_teacher"]
    validate(RESULTS_SCHEMA, json.loads(json.dumps(r)), Path("results.json"), "")  # as `ptd report` reads it back


@pytest.mark.slow
def test_a_damaged_stage_file_is_named_in_the_page_not_blamed_on_results_json(tmp_path, capsys):
    """student/stats.json and a metrics.jsonl line that are not what ptd writes: the report renders,
    and report.html names stats.json in the section that needs it."""
    r = copy.deepcopy(RESULTS)
    r["student"].pop("onnx_latency", None)  # so that `ptd report` looks in stats.json for it
    d = run_folder(tmp_path, r)
    (d / "student").mkdir()
    (d / "student" / "stats.json").write_text("[1]")
    (d / "teacher").mkdir()
    (d / "teacher" / "metrics.jsonl").write_text('5\n{"epoch": 1, "train_loss": 1.0, "lr": 0.1}\n')
    assert main(["report", str(d)]) == 0, capsys.readouterr().err
    page = (d / "report.html").read_text()
    assert f"The per-layer plot: not drawn ({d / 'student' / 'stats.json'}: damaged" in page
    assert "teacher training curves: not available" not in page


def test_a_killed_report_leaves_nothing_the_next_one_keeps(tmp_path, capsys):
    """A `ptd report` killed between a file's write and its rename leaves `.results.json.<random>.tmp`;
    the next `ptd report` (under the directory's lock, like a run) removes it."""
    d = run_folder(tmp_path, RESULTS)
    (d / ".results.json.ynxrhvzl.tmp").write_text('{"half": ')  # what the crash audit found after a kill
    assert main(["report", str(d)]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in d.iterdir()) == ["report.html", "report.md", "results.json"]


def test_a_report_touches_nothing_while_a_run_holds_the_directory(tmp_path, capsys):
    """Another ptd (a run resuming in it) holds the directory's lock: ptd report refuses in one
    line instead of writing beside it."""
    d = run_folder(tmp_path, RESULTS)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom ptd.train.checkpoint import lock_dir\n"
                               f"assert lock_dir({str(d)!r}); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    try:
        assert holder.stdout.readline().strip() == "held"
        line = refused(capsys, d)
        assert "is in use by another ptd process" in line and "run ptd report again" in line
    finally:
        holder.kill()
        holder.wait()
    assert main(["report", str(d)]) == 0  # the holder gone, the report goes ahead


def test_a_report_inside_a_lock_this_process_holds_leaves_it_held(tmp_path, capsys):
    """lock_dir is re-entrant within a process: a library caller that holds the run's lock and
    re-renders its report keeps the lock afterwards."""
    from ptd.report import rerender
    from ptd.train.checkpoint import holds_lock, lock_dir, unlock_dir

    d = run_folder(tmp_path, RESULTS)
    assert lock_dir(d) and holds_lock(d)
    try:
        rerender(d)
        assert holds_lock(d)
    finally:
        unlock_dir(d)
    assert not holds_lock(d)
