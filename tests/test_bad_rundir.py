"""A run directory that cannot take the run's writes is refused before anything is written:
``--out`` itself (a dangling link, a name too long, a path the file system will not let ptd look
at), and, on a resume or a growth, every folder a stage will write into and every file a re-run
reads back. One line, exit 2, and the directory stays as it was, so the command that made it
still works on it. Also: a config with no prunable layer is refused before the teacher trains.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import yaml

from ptd.cli import main
from ptd.errors import PreflightError
from ptd.preflight import check_out_dir

from conftest import tiny_config, write_fashion_like


def _config(data: Path) -> dict:
    """The smallest whole run: one epoch per stage, one student seed, two arms."""
    cfg = tiny_config(data, teacher={"model": {"arch": "vgg", "kwargs": {"plan": [8, "M", 16]}},
                                     "optim": {"epochs": 1, "batch_size": 32, "lr": 0.05, "milestones": []}},
                      prune={"target_sparsity": 0.36, "retrain": {"epochs": 1, "batch_size": 32, "lr": 0.02}},
                      distill={"seeds": [0], "arms": ["scratch", "pruned_teacher"],
                               "optim": {"epochs": 1, "batch_size": 32, "lr": 0.05}})
    cfg["threads"] = 1
    return cfg


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("rundir")
    data = write_fashion_like(ws / "fm", n_train=120, n_test=40)
    (ws / "c.yaml").write_text(yaml.safe_dump(_config(data)))
    return ws


@pytest.fixture(scope="module")
def finished(ws: Path) -> Path:
    """A finished `ptd distill` run (teacher, prune, student, distill) to copy and damage."""
    out = ws / "finished"
    assert main(["distill", str(ws / "c.yaml"), "--out", str(out)]) == 0
    return out


def tree(root: Path) -> dict[str, str]:
    """Every entry under ``root``: a file's sha256, a folder, or a link's target."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = ("link:" + os.readlink(p) if p.is_symlink() else "<dir>" if p.is_dir()
                    else hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def refused(argv: list[str], capsys, root: Path) -> str:
    """main(argv): exit 2, one stderr line, no traceback, nothing under ``root`` changed."""
    before = tree(root)
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and "Traceback" not in err, (rc, err)
    assert len(lines) == 1 and lines[0].startswith("ptd: error: "), err
    assert tree(root) == before, "something under the directory changed"
    return lines[0]


def deny(monkeypatch, *folders: Path) -> None:
    """os.access says no for ``folders`` (as it does for a user without permission: tests run as
    root too, where chmod does not stop anything)."""
    real = os.access
    no = {str(f) for f in folders}
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) in no else real(p, mode, **kw))


# ----------------------------------------------------------------------------- --out itself


def test_a_dangling_link_as_out_is_refused_and_kept(ws: Path, tmp_path: Path, capsys):
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "nowhere")
    line = refused(["train", str(ws / "c.yaml"), "--out", str(link)], capsys, tmp_path)
    assert str(link) in line and "symbolic link" in line and "nowhere" in line
    assert link.is_symlink() and not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("under", ["", "missing/parent/"])
def test_a_name_too_long_for_the_file_system_is_one_line(ws: Path, tmp_path: Path, capsys, under: str):
    out = tmp_path / f"{under}{'n' * 300}" / "run"
    line = refused(["train", str(ws / "c.yaml"), "--out", str(out)], capsys, tmp_path)
    assert "longer than the file system allows" in line and "shorter" in line and str(tmp_path) in line
    assert not (tmp_path / "missing").exists()


def test_a_path_the_file_system_refuses_to_look_at_is_one_line(ws: Path, tmp_path: Path, capsys):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")  # lstat of loop/run: ELOOP, an OSError of its own
    line = refused(["train", str(ws / "c.yaml"), "--out", str(tmp_path / "loop" / "run")], capsys, tmp_path)
    assert str(tmp_path / "loop") in line


def test_missing_parents_are_created_like_mkdir_p(tmp_path: Path):
    from ptd.pipeline import make_dir

    out = tmp_path / "a" / "b" / "run"
    check_out_dir(out)  # documented behaviour (docs/resume.md): not refused
    make_dir(out, f"run directory {out}")
    assert out.is_dir()


def test_an_ancestor_this_user_cannot_write_is_refused(tmp_path: Path, monkeypatch):
    deny(monkeypatch, tmp_path)
    with pytest.raises(PreflightError, match=f"cannot be created: {tmp_path} is not writable"):
        check_out_dir(tmp_path / "a" / "run")


def test_creating_the_run_directory_cannot_fail_with_a_traceback(tmp_path: Path):
    from ptd.pipeline import make_dir

    (tmp_path / "f").write_text("x")  # appeared after the checks, say
    with pytest.raises(PreflightError, match=str(tmp_path / "f")):
        make_dir(tmp_path / "f" / "run", "run directory")


# ----------------------------------------------------------------------------- the teacher's layers


def test_no_prunable_layer_is_refused_before_the_teacher_trains(ws: Path, tmp_path: Path, capsys):
    out = tmp_path / "run"
    line = refused(["prune", str(ws / "c.yaml"), "--set", "teacher.model.kwargs={plan: [8]}", "--set", "prune.exclude_first=true",
                    "--set", "prune.exclude_last=true", "--out", str(out)], capsys, tmp_path)
    assert "the teacher has no prunable Conv/Linear weights" in line and "prune.exclude_first" in line
    assert not out.exists()


# ----------------------------------------------------------------------------- an existing run directory


def copy(finished: Path, tmp_path: Path) -> Path:
    d = tmp_path / "run"
    shutil.copytree(finished, d, symlinks=True)
    return d


GROW = ["--set", "distill.seeds=[0, 1]"]


def original_still_works(ws: Path, run: Path, capsys) -> None:
    capsys.readouterr()
    assert main(["distill", str(ws / "c.yaml"), "--out", str(run)]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("where", ["distill", "tensorboard"])
def test_a_file_where_a_stage_folder_belongs_refuses_a_growth_before_any_write(ws, finished, tmp_path, capsys, where):
    run = copy(finished, tmp_path)
    shutil.rmtree(run / where)
    (run / where).write_text("x")
    line = refused(["distill", str(ws / "c.yaml"), *GROW, "--out", str(run)], capsys, run)
    assert f"{run / where} is a file, where ptd keeps a stage's folder" in line
    (run / where).unlink()
    shutil.copytree(finished / where, run / where)
    original_still_works(ws, run, capsys)  # config.yaml was not rewritten to the grown config


def test_a_stage_folder_this_user_cannot_write_refuses_a_growth(ws, finished, tmp_path, capsys, monkeypatch):
    run = copy(finished, tmp_path)
    deny(monkeypatch, run / "distill")
    line = refused(["distill", str(ws / "c.yaml"), *GROW, "--out", str(run)], capsys, run)
    assert f"{run / 'distill'} is not writable" in line and "distill/scratch_seed1" in line
    monkeypatch.undo()
    original_still_works(ws, run, capsys)


def test_an_unfinished_stage_folder_this_user_cannot_write_refuses_a_resume(ws, finished, tmp_path, capsys, monkeypatch):
    run = copy(finished, tmp_path)
    stage = run / "distill" / "pruned_teacher_seed0"
    (stage / "done").unlink()  # killed before its end: the resume writes into it
    deny(monkeypatch, stage)
    assert f"{stage} is not writable" in refused(["distill", str(ws / "c.yaml"), "--out", str(run)], capsys, run)


@pytest.mark.parametrize("rel", ["report.md", "distill/scratch_seed1/result.json"])
def test_a_folder_where_ptd_writes_a_file_is_refused(ws, finished, tmp_path, capsys, rel):
    run = copy(finished, tmp_path)
    (run / rel).mkdir(parents=True)
    line = refused(["run", str(ws / "c.yaml"), *GROW, "--out", str(run)], capsys, run)
    assert f"{run / rel} is a folder where ptd writes a file" in line


@pytest.mark.parametrize("rel, content", [("teacher/result.json", b"[]"), ("prune/level_1/sparsity.json", b"{not json"),
                                          ("teacher/model.safetensors", b"\x00not what ptd wrote")])
def test_a_damaged_finished_stage_is_refused_before_env_json_is_appended(ws, finished, tmp_path, capsys, rel, content):
    run = copy(finished, tmp_path)
    (run / rel).write_bytes(content)
    line = refused(["run", str(ws / "c.yaml"), "--out", str(run)], capsys, run)  # env.json unchanged: checked by refused
    assert f"{run / rel}: damaged" in line


def test_a_resume_that_passes_the_checks_still_runs(ws, finished, tmp_path, capsys):
    run = copy(finished, tmp_path)
    shutil.rmtree(run / "distill" / "scratch_seed0")
    shutil.rmtree(run / "tensorboard" / "distill" / "scratch_seed0", ignore_errors=True)
    capsys.readouterr()
    assert main(["distill", str(ws / "c.yaml"), "--out", str(run)]) == 0, capsys.readouterr().err
    assert (run / "distill" / "scratch_seed0" / "done").is_file()


def test_a_command_checks_only_the_folders_of_its_own_stages(ws, finished, tmp_path, capsys):
    """`ptd train` writes only the teacher's folder: a file where the distill folder belongs does
    not stop it (it did: preflight checked the whole run's folders for every command)."""
    run = copy(finished, tmp_path)
    shutil.rmtree(run / "distill")
    (run / "distill").write_text("x")
    assert main(["train", str(ws / "c.yaml"), "--out", str(run)]) == 0, capsys.readouterr().err
    assert main(["student", str(ws / "c.yaml"), "--out", str(run)]) == 0, capsys.readouterr().err
    line = refused(["distill", str(ws / "c.yaml"), "--out", str(run)], capsys, run)
    assert f"{run / 'distill'} is a file, where ptd keeps a stage's folder" in line


def test_stage_dirs_are_the_folders_the_pipeline_finishes(ws, finished):
    """preflight.stage_dirs names the folders as ptd.pipeline makes them, per command."""
    from ptd.config import load_config
    from ptd.preflight import stage_dirs

    cfg = load_config(ws / "c.yaml")
    done = {p.parent.relative_to(finished) for p in finished.rglob("done") if p.parent != finished
            and not p.parent.name.startswith(("level_", "round_")) and "tensorboard" not in p.parts}
    assert set(stage_dirs(cfg, until="distill")) == done
    assert stage_dirs(cfg, until="teacher") == [Path("teacher")]
    assert set(stage_dirs(cfg, until="student")) == {Path("teacher"), Path("prune"), Path("student")}
    assert set(stage_dirs(cfg, until="distill", arms=["scratch"])) == {Path("teacher"), Path("prune"), Path("student"),
                                                                       Path("distill/scratch_seed0")}
    with pytest.raises(ValueError, match="valid: teacher, prune"):
        stage_dirs(cfg, until="nope")
