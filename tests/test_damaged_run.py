"""A finished run directory whose files something else damaged (a disk, a sync tool, an editor):
``ptd report`` and ``ptd run`` on it either succeed (the file is rewritten or not needed) or end
with one line ``ptd: error: <the file>: damaged (...); <the fix>``, exit 2, never a traceback.

ptd itself writes every file whole (tests/test_crash.py kills it at every write), so this is the
outside-world half. Found by damaging each of a tiny run's 50 files in turn: 38 of the 150
damages ended in a JSONDecodeError, SafetensorError, YAML ReaderError or AttributeError traceback.
One file of each kind is damaged here.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from ptd.cli import main

from conftest import tiny_config, write_fashion_like

pytestmark = pytest.mark.slow

KINDS = [
    "config.yaml", "env.json", "results.json", "report.md",
    "teacher/result.json", "teacher/model.safetensors", "teacher/metrics.jsonl", "teacher/done",
    "prune/result.json", "prune/level_2/masks.safetensors", "prune/level_2/sparsity.json", "prune/level_2/model.safetensors",
    "student/stats.json", "student/architecture.json",
    "distill/pruned_teacher_seed0/result.json", "distill/pruned_teacher_seed0/model.safetensors",
    "distill/pruned_teacher_seed0/metrics.jsonl",
]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    ws = tmp_path_factory.mktemp("damaged")
    data = write_fashion_like(ws / "fm", n_train=120, n_test=40)
    cfg = ws / "c.yaml"
    # every arm, the control's too: each kind of stage folder is in the run
    cfg.write_text(yaml.safe_dump(tiny_config(data, distill={"arms": ["scratch", "unpruned_teacher", "pruned_teacher", "retrained_teacher"]})))
    assert main(["run", str(cfg), "--out", str(ws / "run")]) == 0
    return cfg, ws / "run"


@pytest.mark.parametrize("rel", KINDS)
def test_a_damaged_file_is_one_line_naming_it(finished, tmp_path, capsys, rel):
    cfg, run = finished
    d = tmp_path / "run"
    shutil.copytree(run, d)
    assert (d / rel).is_file(), rel
    (d / rel).write_bytes(b"\x00not what ptd wrote{{{")
    for argv in (["report", str(d)], ["run", str(cfg), "--out", str(d)]):
        capsys.readouterr()
        rc = main(argv)
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert rc in (0, 2), (rel, argv[0], rc, err)
        if rc == 2:
            assert len(err) == 1 and err[0].startswith("ptd: error: "), (rel, argv[0], err)
            assert str(d / rel) in err[0] or "results.json" in err[0], (rel, err[0])


def test_the_fix_says_which_stage_to_redo(finished, tmp_path, capsys):
    cfg, run = finished
    d = tmp_path / "run"
    shutil.copytree(run, d)
    (d / "prune" / "level_2" / "masks.safetensors").write_bytes(b"")
    assert main(["run", str(cfg), "--out", str(d)]) == 2
    line = capsys.readouterr().err.strip()
    assert f"{d}/prune/level_2/masks.safetensors: damaged" in line
    assert f"delete {d}/prune/level_2 and the stages after it to redo them" in line


@pytest.mark.parametrize("rel", ["config.yaml", "student/architecture.json", "teacher/result.json"])
def test_a_file_cut_short_is_named_damaged(finished, tmp_path, capsys, rel):
    """The kill audit's F4/F6: a config.yaml cut in half still parses (as a mapping missing its last
    keys) and was refused as "a different config"; a student/architecture.json cut in half went
    unnoticed by a resume, which reads it only in `ptd eval`/`export`. Both are now "damaged"."""
    cfg, run = finished
    d = tmp_path / "run"
    shutil.copytree(run, d)
    data = (d / rel).read_bytes()
    (d / rel).write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    assert main(["run", str(cfg), "--out", str(d)]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"ptd: error: {d / rel}: damaged ("), line
    if rel == "config.yaml":
        assert "sha256 in its first line" in line and "delete the first line" in line
        (d / rel).write_bytes(data.split(b"\n", 1)[1])  # a config without the seal (hand-written, older ptd) still reads
        assert main(["run", str(cfg), "--out", str(d)]) == 0


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _refused_unchanged(capsys, cfg: Path, d: Path, named: Path) -> str:
    before = _tree(d)
    capsys.readouterr()
    assert main(["run", str(cfg), "--out", str(d)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and str(named) in err[0], err
    assert _tree(d) == before  # env.json included: a refused re-run adds no session
    return err[0]


def test_every_finished_stage_record_that_parses_but_is_not_ptds_is_refused_up_front(finished, tmp_path, capsys):
    """Valid JSON with a key missing or of the wrong type once passed the up-front parse check and
    ended mid-run in a KeyError or TypeError (exit 1), after env.json had a session added."""
    from ptd.pipeline import _record_file

    cfg, run = finished
    stages = sorted(m.parent.relative_to(run) for m in run.rglob("done") if m.parent != run)
    assert {"teacher", "prune", "prune/level_1", "student", "control", "control/round_1",
            "distill/scratch_seed0"} <= {s.as_posix() for s in stages}
    for rel in stages:
        record = rel / _record_file(run / rel)
        for edit in ("{}", "wrong type"):
            d = tmp_path / "run"
            shutil.rmtree(d, ignore_errors=True)
            shutil.copytree(run, d)
            if edit == "{}":
                (d / record).write_text("{}")
            else:  # a key the pipeline or the report reads back becomes a string
                import json

                data = json.loads((d / record).read_text())
                k = next(k for k in ("test_acc", "sparsity", "student") if k in data)
                data[k] = "high"
                (d / record).write_text(json.dumps(data))
            line = _refused_unchanged(capsys, cfg, d, d / record)
            assert "not the record ptd writes" in line or "has changed since" in line, (record, edit, line)


@pytest.mark.parametrize("rel", ["teacher/model.safetensors", "prune/level_1/model.safetensors", "prune/level_1/masks.safetensors",
                                 "student/architecture.json", "control/round_1/model.safetensors",
                                 "distill/scratch_seed0/model.safetensors"])
def test_a_finished_stage_missing_its_weights_is_refused_up_front(finished, tmp_path, capsys, rel):
    cfg, run = finished
    d = tmp_path / "run"
    shutil.copytree(run, d)
    (d / rel).unlink()
    line = _refused_unchanged(capsys, cfg, d, d / rel)
    assert "missing" in line and "delete" in line


def test_a_resume_commit_that_is_not_ptds_is_refused_before_env_json_changes(finished, tmp_path, capsys):
    """resume.pt was read only when its stage started: a foreign one was refused after env.json had
    a session added, and a pickled object was named by torch's error cut off mid-sentence."""
    import os
    import pickle

    import torch

    cfg, run = finished
    d = tmp_path / "run"
    shutil.copytree(run, d)
    shutil.rmtree(d / "distill" / "scratch_seed1")  # an unfinished stage, with a commit of its own
    (d / "distill" / "scratch_seed1").mkdir()
    pwned = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {pwned}",))

    resume = d / "distill" / "scratch_seed1" / "resume.pt"
    for content, words in [(pickle.dumps(Evil()), "not the zip archive"), (None, "Python objects other than tensors"),
                           ({"format": "other"}, "format")]:
        if content is None:
            torch.save({"format": 1, "x": Evil()}, resume)
        elif isinstance(content, bytes):
            resume.write_bytes(content)
        else:
            torch.save(content, resume)
        line = _refused_unchanged(capsys, cfg, d, resume)
        assert words in line and f"delete {resume}" in line, line
    assert not pwned.exists()


def test_a_huge_recorded_config_is_refused_unread(tmp_path):
    """A run's config.yaml was read whole and parsed by PyYAML (a 600 MB file hung the user's config
    for minutes: bad-input audit); it is held to the bound of a user's config, and named damaged."""
    from ptd.config import MAX_CONFIG_BYTES
    from ptd.errors import DamagedFileError
    from ptd.io import MAX_YAML_BYTES, read_yaml_mapping

    assert MAX_YAML_BYTES == MAX_CONFIG_BYTES  # the bound of a user's config

    f = tmp_path / "config.yaml"
    f.write_bytes(b"#" * (MAX_YAML_BYTES + 1))
    with pytest.raises(DamagedFileError, match=r"config\.yaml: damaged \(over 1,048,576 bytes, more than a config ptd writes\)"):
        read_yaml_mapping(f)
