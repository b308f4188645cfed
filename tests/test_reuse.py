"""``--from RUN``: another student (or distillation) from the same pruned teacher without training
the teacher and pruning again. The copied stages must give what a fresh run of the new config
gives, bit for bit; a run they would not be that for is refused up front (one line, exit 2,
nothing written, the earlier run untouched); a kill in the copy leaves --out as it was.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import ptd.pipeline as pipeline
from ptd import paths as P
from ptd.cli import main

from conftest import tiny_config, write_fashion_like


def _config(data: Path, **student) -> dict:
    cfg = tiny_config(data, teacher={"model": {"arch": "vgg", "kwargs": {"plan": [16, "M", 32, "M", 32]}},
                                     "optim": {"epochs": 1, "batch_size": 32, "lr": 0.05, "milestones": []}},
                      prune={"target_sparsity": 0.36, "retrain": {"epochs": 1, "batch_size": 32, "lr": 0.02}},
                      distill={"seeds": [0], "arms": ["scratch", "pruned_teacher", "retrained_teacher"],
                               "optim": {"epochs": 1, "batch_size": 32, "lr": 0.05}},
                      student={"round_to": 8, **student})
    cfg["threads"] = 1
    cfg["teacher"]["check_learned"] = False  # a 1-epoch teacher of 160 images, loaded back with --teacher: near chance
    return cfg


def tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): ("<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("reuse")
    data = write_fashion_like(ws / "fm", n_train=120, n_test=40)
    (ws / "a.yaml").write_text(yaml.safe_dump(_config(data)))
    (ws / "b.yaml").write_text(yaml.safe_dump(_config(data, round_to=1)))  # the paper's exact widths
    return ws


@pytest.fixture(scope="module")
def earlier(ws: Path) -> Path:
    """A finished run at round_to 8: teacher, pruning, control, student, students."""
    out = ws / "a"
    assert main(["distill", str(ws / "a.yaml"), "--out", str(out)]) == 0
    return out


def test_a_run_from_an_earlier_one_gives_what_a_fresh_run_gives(ws, earlier, capsys):
    before = tree(earlier)
    out = ws / "b_from_a"
    assert main(["distill", str(ws / "b.yaml"), "--out", str(out), "--from", str(earlier)]) == 0
    assert tree(earlier) == before  # only read
    reused = json.loads((out / P.REUSED).read_text())
    assert reused["from"] == str(earlier.resolve())
    assert reused["stages"] == [P.TEACHER, P.PRUNE, P.CONTROL]
    for stage in (P.TEACHER, P.PRUNE, P.CONTROL):  # copied, not trained again: the same files, done included
        assert {k: v for k, v in tree(out / stage).items()} == tree(earlier / stage)
    # The other student: the exact rule's widths, not round_to 8's.
    a_plan = json.loads((earlier / P.STUDENT / P.STATS).read_text())["spec"]["plan"]
    b_plan = json.loads((out / P.STUDENT / P.STATS).read_text())["spec"]["plan"]
    assert a_plan != b_plan and any(isinstance(w, int) and w % 8 for w in b_plan)
    # ...and the same bytes as a run of b.yaml from nothing, stage by stage.
    fresh = ws / "b_fresh"
    assert main(["distill", str(ws / "b.yaml"), "--out", str(fresh)]) == 0
    for f in sorted(fresh.rglob(P.MODEL)):
        rel = f.relative_to(fresh)
        assert (out / rel).read_bytes() == f.read_bytes(), rel
    assert (out / P.STUDENT / P.STATS).read_text().split('"latency"')[0] == (fresh / P.STUDENT / P.STATS).read_text().split('"latency"')[0]
    # Re-run: it holds the run now, so it resumes (nothing copied, nothing trained, nothing changed).
    made = tree(out)
    assert main(["distill", str(ws / "b.yaml"), "--out", str(out), "--from", str(earlier)]) == 0
    assert {k: v for k, v in tree(out).items() if k != P.ENV} == {k: v for k, v in made.items() if k != P.ENV}
    # ...and grows like any run, without --from.
    assert main(["distill", str(ws / "b.yaml"), "--out", str(out), "--set", "distill.seeds=[0,1]"]) == 0
    assert (P.distill_dir(out, "scratch", 1) / P.DONE).is_file()
    # --from with an --out that holds a run not copied from it: ignored without a word before (the
    # user read the result as made from that run's teacher: new-user audit); one line, nothing written.
    made = tree(fresh)
    _refused(capsys, ["distill", str(ws / "b.yaml"), "--out", str(fresh), "--from", str(earlier)],
             f"--out {fresh} already holds a run, started without --from", "drop --from to resume")
    other = ws / "other_copy"
    shutil.copytree(out, other)
    (other / P.REUSED).write_text(json.dumps({**reused, "from": str(ws / "elsewhere")}))
    _refused(capsys, ["distill", str(ws / "b.yaml"), "--out", str(other), "--from", str(earlier)],
             f"already holds a run copied from {ws / 'elsewhere'}, not from {earlier.resolve()}")
    assert tree(fresh) == made


def _refused(capsys, argv: list[str], *words: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return err


@pytest.mark.parametrize("setting, named", [
    ("teacher.optim.lr=0.04", "teacher.optim.lr"),
    ("prune.target_sparsity=0.2", "prune.target_sparsity"),
    ("seed=1", "seed"),
    ("data.val_fraction=0.25", "data.val_fraction"),
    ("fast_wgrad=false", "fast_wgrad"),
])
def test_a_teacher_side_key_that_differs_is_refused_before_anything_is_written(ws, earlier, tmp_path, capsys, setting, named):
    before = tree(earlier)
    out = tmp_path / "new"
    _refused(capsys, ["run", str(ws / "b.yaml"), "--out", str(out), "--from", str(earlier), "--set", setting],
             f"--from {earlier}", named, "set it back, or run without --from")
    assert not out.exists() and tree(earlier) == before
    assert not list(tmp_path.glob(".*.tmp"))


def test_student_and_distill_keys_may_differ(ws, earlier, tmp_path):
    out = tmp_path / "new"
    assert main(["student", str(ws / "a.yaml"), "--out", str(out), "--from", str(earlier), "--set", "student.round_to=16",
                 "--set", "distill.temperature=4", "--set", "name=other", "--set", "threads=2"]) == 0
    assert (out / P.STUDENT / P.DONE).is_file()


def test_what_cannot_serve_as_from_is_one_line(ws, earlier, tmp_path, capsys):
    b = str(ws / "b.yaml")
    _refused(capsys, ["run", b, "--out", str(tmp_path / "n1"), "--from", str(tmp_path / "missing")], "not a ptd run directory")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "x.txt").write_text("x")
    _refused(capsys, ["run", b, "--out", str(tmp_path / "n2"), "--from", str(tmp_path / "plain")], "not a ptd run directory")
    _refused(capsys, ["run", b, "--out", str(tmp_path / "n3"), "--from", str(tmp_path / "plain" / "x.txt")], "not a ptd run directory")
    _refused(capsys, ["run", b, "--out", str(tmp_path / "n4"), "--from", " "], "--from: an empty value")
    # the earlier run itself, or a folder inside it, as --out
    before = tree(earlier)
    _refused(capsys, ["run", b, "--out", str(earlier), "--from", str(earlier)], "overlap")
    _refused(capsys, ["run", b, "--out", str(earlier / "sub"), "--from", str(earlier)], "overlap")
    assert tree(earlier) == before
    # a run with no finished teacher
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(earlier / P.CONFIG, half / P.CONFIG)
    _refused(capsys, ["run", b, "--out", str(tmp_path / "n5"), "--from", str(half)], "no finished teacher")
    for n in ("n1", "n2", "n3", "n4", "n5"):
        assert not (tmp_path / n).exists()


def test_a_damaged_or_stale_stage_of_the_earlier_run_is_refused_and_named(ws, earlier, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(earlier, src)
    model = src / P.level_dir(src / P.PRUNE, 1) / P.MODEL
    model.write_bytes(model.read_bytes()[:100])
    _refused(capsys, ["run", str(ws / "b.yaml"), "--out", str(tmp_path / "n"), "--from", str(src)], str(model))
    assert not (tmp_path / "n").exists()
    shutil.rmtree(src)
    shutil.copytree(earlier, src)
    # the teacher redone after its pruning was made: the pruning belongs to another teacher
    teacher = src / P.TEACHER / P.MODEL
    from safetensors.torch import load_file, save_file

    w = load_file(str(teacher))
    w = {k: v + 1 if v.is_floating_point() else v for k, v in w.items()}
    save_file(w, str(teacher))
    _refused(capsys, ["run", str(ws / "b.yaml"), "--out", str(tmp_path / "n"), "--from", str(src)], "has changed since", "prune")
    assert not (tmp_path / "n").exists()


def test_a_kill_in_the_copy_leaves_out_as_it_was_and_the_command_copies_again(ws, earlier, tmp_path, monkeypatch):
    out = tmp_path / "new"
    out.mkdir()  # an empty folder is a valid --out, and stays one
    real = shutil.copytree
    calls = []

    def dying(*a, **k):
        calls.append(a[0])
        if len(calls) == 2:
            raise KeyboardInterrupt  # a Ctrl-C halfway through the copy
        return real(*a, **k)

    monkeypatch.setattr(shutil, "copytree", dying)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_pipeline(pipeline_cfg(ws / "b.yaml"), out, until="student", reuse_from=earlier, log=lambda s: None)
    assert out.is_dir() and not any(out.iterdir())
    assert not list(tmp_path.glob(".*.tmp"))
    monkeypatch.setattr(shutil, "copytree", real)
    assert main(["student", str(ws / "b.yaml"), "--out", str(out), "--from", str(earlier)]) == 0
    assert tree(out / P.TEACHER) == tree(earlier / P.TEACHER)


def pipeline_cfg(path: Path):
    from ptd.config import load_config

    return load_config(str(path), [])


def test_a_copy_left_by_a_killed_process_is_removed(ws, earlier, tmp_path):
    out = tmp_path / "new"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = tmp_path / f".new.from-{int(dead.stdout)}.tmp"
    (left / P.TEACHER).mkdir(parents=True)
    mine = tmp_path / ".new.from-notapid.tmp"  # not named by ptd: kept
    mine.mkdir()
    assert main(["student", str(ws / "b.yaml"), "--out", str(out), "--from", str(earlier)]) == 0
    assert not left.exists() and mine.exists()


def test_a_folder_that_is_not_a_run_is_refused_before_the_copy(ws, earlier, tmp_path, capsys):
    """As without --from (one line naming the folder), not after copying ("Directory not empty")."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = tree(earlier)
    _refused(capsys, ["run", str(ws / "b.yaml"), "--out", str(out), "--from", str(earlier)],
             f"{out} exists and is not a ptd run directory", "new or empty directory")
    assert tree(out) == {"notes.txt": hashlib.sha256(b"mine").hexdigest()} and tree(earlier) == before
    assert not list(tmp_path.glob(".*.tmp"))


def test_out_a_link_to_an_empty_folder_takes_the_copy(ws, earlier, tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    assert main(["student", str(ws / "b.yaml"), "--out", str(link), "--from", str(earlier)]) == 0
    assert link.is_symlink() and (target / P.CONFIG).is_file() and tree(target / P.TEACHER) == tree(earlier / P.TEACHER)


def test_a_run_name_with_glob_characters_removes_only_its_own_killed_copy(ws, earlier, tmp_path):
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)
    mine = tmp_path / f".o[4].from-{dead}.tmp"
    other = tmp_path / f".o4.from-{dead}.tmp"  # run o4's, which the pattern .o[4].from-*.tmp matched
    for d in (mine, other):
        d.mkdir()
    assert main(["student", str(ws / "b.yaml"), "--out", str(tmp_path / "o[4]"), "--from", str(earlier)]) == 0
    assert not mine.exists() and other.exists()


def test_an_unreadable_file_of_the_earlier_run_is_one_line(ws, earlier, tmp_path, capsys, monkeypatch):
    """Checked up front (os.access; faked here, as root reads everything), and a copy that fails
    anyway (shutil.Error, a list) is one line too, --out left as it was."""
    victim = (earlier / P.TEACHER / P.MODEL).resolve()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p).resolve() == victim else real_access(p, mode, **k))
    out = tmp_path / "new"
    _refused(capsys, ["run", str(ws / "b.yaml"), "--out", str(out), "--from", str(earlier)],
             f"{victim} cannot be read by this user", "chmod -R u+rX")
    assert not out.exists()
    monkeypatch.setattr(os, "access", real_access)
    real_copy = shutil.copy2

    def denied(s, d, *a, **k):
        if Path(s).resolve() == victim:
            raise PermissionError(13, "Permission denied", str(s))
        return real_copy(s, d, *a, **k)

    real_tree = shutil.copytree
    monkeypatch.setattr(shutil, "copytree", lambda *a, **k: real_tree(*a, **k, copy_function=denied))
    out.mkdir()
    _refused(capsys, ["run", str(ws / "b.yaml"), "--out", str(out), "--from", str(earlier)],
             "could not be copied", "Permission denied", f"{out} is left as it was")
    assert out.is_dir() and not any(out.iterdir()) and not list(tmp_path.glob(".*.tmp"))


def test_a_teacher_checkpoint_is_the_same_file_however_it_is_spelled(ws, earlier, tmp_path, monkeypatch, capsys):
    """--teacher t.safetensors given in one folder and /abs/t.safetensors (or ../x/t.safetensors)
    from another name one file: the run resumes and --from reuses it. A run written before paths
    were made absolute (config.yaml naming it relative) is matched through its teacher's record."""
    given = tmp_path / "given"
    given.mkdir()
    shutil.copy(earlier / P.TEACHER / P.MODEL, given / "t.safetensors")
    monkeypatch.chdir(given)
    r1 = tmp_path / "r1"
    assert main(["train", str(ws / "a.yaml"), "--teacher", "t.safetensors", "--out", str(r1)]) == 0
    assert yaml.safe_load((r1 / P.CONFIG).read_text())["teacher"]["checkpoint"] == str(given / "t.safetensors")
    monkeypatch.chdir(tmp_path)
    assert main(["prune", str(ws / "a.yaml"), "--teacher", "given/t.safetensors", "--out", str(r1)]) == 0  # resumed, grown to prune
    assert main(["student", str(ws / "b.yaml"), "--teacher", str(given / "t.safetensors"), "--out", str(tmp_path / "r2"),
                 "--from", str(r1)]) == 0
    # config.yaml as ptd wrote it before: the path as given, relative to the folder it ran in
    cfg = yaml.safe_load((r1 / P.CONFIG).read_text())
    cfg["teacher"]["checkpoint"] = "t.safetensors"
    (r1 / P.CONFIG).write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert main(["student", str(ws / "b.yaml"), "--teacher", "given/t.safetensors", "--out", str(tmp_path / "r3"),
                 "--from", str(r1)]) == 0
    # another file of the same name is another teacher
    (tmp_path / "other").mkdir()
    shutil.copy(given / "t.safetensors", tmp_path / "other" / "t.safetensors")
    capsys.readouterr()
    _refused(capsys, ["student", str(ws / "b.yaml"), "--teacher", "other/t.safetensors", "--out", str(tmp_path / "r4"),
                      "--from", str(r1)], "teacher.checkpoint")


def test_a_ptd_running_in_the_earlier_run_holds_the_copy_off_and_copies_share(ws, earlier, tmp_path, capsys, monkeypatch):
    """--from takes a shared lock on RUN_DIR from its checks to the end of the copy: a ptd running
    there (which holds it exclusively) is refused up front, as a ptd starting there mid-copy is; two
    --from copies of one run (benchmarks/round_accuracy.py --parallel) go side by side."""
    import fcntl

    from ptd.train import checkpoint as ckpt

    fd = os.open(earlier, os.O_RDONLY | os.O_DIRECTORY)  # a writer: what lock_dir takes
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _refused(capsys, ["run", str(ws / "b.yaml"), "--out", str(tmp_path / "n1"), "--from", str(earlier)],
                 f"--from {earlier}: another ptd process is running in it", "wait for it")
        assert not (tmp_path / "n1").exists()
        fcntl.flock(fd, fcntl.LOCK_UN)
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # another --from copying it now
        assert main(["student", str(ws / "b.yaml"), "--out", str(tmp_path / "n2"), "--from", str(earlier)]) == 0
    finally:
        os.close(fd)
    seen = []
    real = shutil.copytree

    def copying(*a, **k):  # a ptd starting in the earlier run mid-copy is refused its lock
        seen.append(ckpt.lock_dir(earlier))
        return real(*a, **k)

    monkeypatch.setattr(shutil, "copytree", copying)
    assert main(["student", str(ws / "b.yaml"), "--out", str(tmp_path / "n3"), "--from", str(earlier)]) == 0
    assert seen and not any(seen)
    assert ckpt.lock_dir(earlier)  # released once copied
    ckpt.unlock_dir(earlier)


def test_from_holds_no_lock_on_the_earlier_run_through_preflight(ws, earlier, tmp_path, monkeypatch):
    """--from held RUN_DIR's shared lock through all of preflight (seconds; a minute for the largest
    torchvision teachers), so a ptd started there meanwhile (resuming it) was refused as "in use".
    The lock is now held for the checks of RUN_DIR's files and for the copy, not in between."""
    import ptd.preflight as pf
    from ptd.train import checkpoint as ckpt

    seen = []
    real = pf.preflight

    def checking(*a, **k):  # a ptd started in the earlier run while --from's preflight runs
        seen.append(ckpt.lock_dir(earlier))
        ckpt.unlock_dir(earlier)
        return real(*a, **k)

    monkeypatch.setattr(pf, "preflight", checking)
    assert main(["student", str(ws / "b.yaml"), "--out", str(tmp_path / "n"), "--from", str(earlier)]) == 0
    assert seen == [True]
    assert (tmp_path / "n" / P.TEACHER / P.DONE).is_file()


def test_the_earlier_run_changed_during_preflight_is_checked_again_before_the_copy(ws, earlier, tmp_path, monkeypatch, capsys):
    """With the lock let go through preflight, RUN_DIR may change then (a stage redone by a ptd run
    there): its files are checked again under the lock held to the end of the copy, so a stage made
    stale meanwhile is refused, not copied."""
    import ptd.preflight as pf

    src = tmp_path / "src"
    shutil.copytree(earlier, src)
    real = pf.preflight

    def redoing(*a, **k):  # the teacher redone (other weights) while --from's preflight runs
        out = real(*a, **k)
        model = src / P.TEACHER / P.MODEL
        model.write_bytes(model.read_bytes()[:-4] + b"\x00\x00\x80\x3f")
        return out

    monkeypatch.setattr(pf, "preflight", redoing)
    _refused(capsys, ["student", str(ws / "b.yaml"), "--out", str(tmp_path / "n"), "--from", str(src)],
             f"--from {src}: its finished stage", "teacher/model.safetensors")
    assert not (tmp_path / "n").exists()


def test_a_run_recorded_with_a_relative_data_root_resumes_from_the_same_folder(ws, earlier, tmp_path, monkeypatch):
    """config.yaml written before paths were made absolute names data.root as given ('fm'); the
    same command from the same folder now loads it as /abs/fm, the same folder: a resume, not
    'a different config'."""
    run = tmp_path / "run"
    shutil.copytree(earlier, run)
    cfg = yaml.safe_load((run / P.CONFIG).read_text())
    root = Path(cfg["data"]["root"])
    monkeypatch.chdir(root.parent)
    cfg["data"]["root"] = root.name  # relative, as an older ptd wrote it
    (run / P.CONFIG).write_text(yaml.safe_dump(cfg, sort_keys=False))
    before = tree(run / P.TEACHER)
    assert main(["distill", str(ws / "a.yaml"), "--out", str(run), "--set", f"data.root={root.name}"]) == 0
    assert tree(run / P.TEACHER) == before


# Every key added after the first committed run (benchmarks/results/fashion_mnist_lowdata, 3e1b971)
# was written, with the value the code ran with before the commit that added it.
BEFORE_THE_KEY = [("student.round_narrower", False),  # 8e698aa added it off
                  ("fast_wgrad", False),  # 3a7ddf4: oneDNN's weight gradients
                  ("compile", "off"),  # ad8d3e0
                  ("jobs", 1),  # add7f0d: one student at a time
                  ("prune.retrain_checkpoint", "best"),  # 47ffc5b
                  ("data.check_images", "headers"),  # faa20e5: headers stays the default
                  ("teacher.check_learned", False)]  # 14543e7: a loaded teacher was not scored


@pytest.mark.parametrize("key, was", BEFORE_THE_KEY, ids=[k for k, _ in BEFORE_THE_KEY])
def test_a_run_written_before_a_key_existed_resumes_only_as_it_ran(tmp_path, key, was):
    """A config.yaml without a key added since (ptd.config.ADDED_KEYS) reads as the value the code
    before the key ran with: where that is today's default, or the key only changes how a run is
    shown or checked, today's config resumes it (compile was refused as "None there, 'off' now"); else
    today's default is refused naming the key and both values (fast_wgrad read "None there"), and
    --set of the old value resumes it (prune.retrain_checkpoint: 'best' there, 'last' now)."""
    from ptd.config import dump_yaml, load_config
    from ptd.pipeline.rundir import _VOLATILE_KEYS

    path = tuple(key.split("."))
    run = tmp_path / "run"
    run.mkdir()
    old = yaml.safe_load(dump_yaml(load_config()))
    node = old
    for section in path[:-1]:
        node = node[section]
    now = node.pop(path[-1])
    (run / P.CONFIG).write_text(yaml.safe_dump(old))
    as_it_ran = load_config(None, [f"{key}={json.dumps(was)}"])
    assert pipeline.check_run_config(as_it_ran, run) is False
    if was == now or key in _VOLATILE_KEYS:
        assert pipeline.check_run_config(load_config(), run) is False
    else:
        with pytest.raises(pipeline.RunDirError, match=re.escape(f"({key}: {was!r} there, {now!r} now)")):
            pipeline.check_run_config(load_config(), run)


def test_data_check_images_may_change_on_resume_and_be_missing_from_an_older_run(tmp_path):
    """data.check_images changes what the pre-training check reads, not what a run computes: a
    resume may switch it, and a config.yaml written before the key existed still matches. Every
    other data key still must match (data.hflip here)."""
    from ptd.config import dump_yaml, load_config

    run = tmp_path / "run"
    run.mkdir()
    old = yaml.safe_load(dump_yaml(load_config()))
    del old["data"]["check_images"]
    (run / P.CONFIG).write_text(yaml.safe_dump(old))
    assert pipeline.check_run_config(load_config(), run) is False
    assert pipeline.check_run_config(load_config(None, ["data.check_images=full"]), run) is False
    # data.workers: folder augmentation is seeded per image, so the weights do not depend on it (tests/test_data.py)
    assert pipeline.check_run_config(load_config(None, ["data.workers=0"]), run) is False
    with pytest.raises(pipeline.RunDirError, match=r"data\.hflip: True there, False now"):
        pipeline.check_run_config(load_config(None, ["data.hflip=false", "data.check_images=full"]), run)
