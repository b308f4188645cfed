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
    cfg.write_text(yaml.safe_dump(tiny_config(data)))
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
