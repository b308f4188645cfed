"""The CLI's last line of defence: whatever reaches `main` uncaught still ends in one line.

A file-system refusal (permission, disk full, a folder in the way) is the user's environment, so
it is a user error (exit 2) naming the path and a fix; a bug is one line (exit 1) with the
traceback kept in a file, so no input can make ptd print a traceback at a user."""
from __future__ import annotations

import errno
import re

import pytest

from ptd import cli


def _run_raising(monkeypatch, capsys, exc: BaseException) -> tuple[int, list[str]]:
    def boom(args):
        raise exc

    monkeypatch.setattr(cli, "cmd_report", boom)
    rc = cli.main(["report", "somewhere"])
    err = capsys.readouterr().err
    return rc, err.splitlines()


@pytest.mark.parametrize("code, words", [
    (errno.EACCES, "permission"),
    (errno.ENOSPC, "disk space"),
    (errno.EISDIR, "folder is where a file belongs"),
    (errno.ENAMETOOLONG, "shorter name"),
    (errno.EEXIST, "already there"),
])
def test_an_os_error_is_one_line_naming_the_path_and_a_fix(monkeypatch, capsys, code, words):
    rc, lines = _run_raising(monkeypatch, capsys, OSError(code, "the system's words", "/the/path/it/touched"))
    assert rc == 2
    assert len(lines) == 1 and lines[0].startswith("ptd: error: /the/path/it/touched: the system's words;")
    assert words in lines[0]


def test_a_rename_error_names_both_paths(monkeypatch, capsys):
    rc, lines = _run_raising(monkeypatch, capsys, PermissionError(errno.EACCES, "Permission denied", "/a/tmp", None, "/a/final"))  # winerror is the 4th
    assert rc == 2 and lines == ["ptd: error: /a/tmp -> /a/final: Permission denied; give this user permission on it, or choose another path"]


def test_out_of_memory_and_deep_nesting_are_user_errors(monkeypatch, capsys):
    rc, lines = _run_raising(monkeypatch, capsys, MemoryError())
    assert rc == 2 and len(lines) == 1 and "out of memory" in lines[0] and "batch sizes" in lines[0]
    rc, lines = _run_raising(monkeypatch, capsys, RecursionError("maximum recursion depth exceeded"))
    assert rc == 2 and len(lines) == 1 and "nested too deeply" in lines[0]


def test_a_bug_is_one_line_and_its_traceback_is_kept_in_a_file(monkeypatch, capsys):
    monkeypatch.delenv("PTD_TRACEBACK", raising=False)
    rc, lines = _run_raising(monkeypatch, capsys, KeyError("no_such_key"))
    assert rc == 1 and len(lines) == 1
    assert lines[0].startswith("ptd: internal error: KeyError: 'no_such_key'; this is a bug in ptd")
    path = re.search(r"the traceback is in (\S+) ", lines[0]).group(1)
    text = open(path).read()
    assert "Traceback" in text and "in boom" in text and "KeyError: 'no_such_key'" in text


def test_ptd_traceback_shows_the_real_exception(monkeypatch, capsys):
    monkeypatch.setenv("PTD_TRACEBACK", "1")
    with pytest.raises(ZeroDivisionError):
        _run_raising(monkeypatch, capsys, ZeroDivisionError("bug"))


def test_help_says_where_results_go_and_how_to_resume_and_there_is_a_version(capsys):
    """--help named neither the files a run writes nor that re-running resumes it, and there was no
    --version (new-user audit)."""
    from ptd import __version__
    from ptd.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"ptd {__version__}"
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "report.md, report.html and results.json" in text and "resumes it after a kill" in text
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "again resumes a killed run" in text and "default: the config's device" in text and '"Configuration"' in text


# ---------------------------------------------------------------- link loops on the command line (bad-input audit, F6's class)


def test_eval_of_a_model_link_loop_without_a_config_is_one_line_not_an_internal_error(tmp_path, capsys):
    """Finding the model's run (ptd.paths.run_dir_of, Path.resolve) raised RuntimeError on the loop."""
    loop = tmp_path / "m.safetensors"
    loop.symlink_to("m.safetensors")
    assert cli.main(["eval", str(loop)]) == 2
    assert capsys.readouterr().err == (f"ptd: error: {loop}: cannot be opened (Too many levels of symbolic links); give a "
                                       f".safetensors file written by ptd (e.g. runs/<name>/teacher/model.safetensors)\n")


def test_from_a_link_loop_is_one_line_not_an_internal_error(tmp_path, tiny_yaml, capsys):
    loop = tmp_path / "earlier"
    loop.symlink_to("earlier")
    out = tmp_path / "o"
    assert cli.main(["distill", str(tiny_yaml), "--out", str(out), "--from", str(loop)]) == 2
    assert capsys.readouterr().err == (f"ptd: error: --from {loop}: cannot be opened (Too many levels of symbolic links); give "
                                       f"the earlier run directory whose teacher and pruning to reuse, or leave --from out\n")
    assert not out.exists()


def test_report_and_compare_of_a_link_loop_name_the_loop(tmp_path, capsys):
    """`ptd report LOOP` said "results.json not found: ... not a finished ptd run" of a folder the
    user can see; `ptd compare` too (review of the export fixes)."""
    loop = tmp_path / "run"
    loop.symlink_to("run")
    assert cli.main(["report", str(loop)]) == 2
    assert capsys.readouterr().err == (f"ptd: error: ptd report {loop}: cannot be opened (Too many levels of symbolic links); "
                                       f"give the finished run or sweep directory itself\n")
    other = tmp_path / "other"
    other.mkdir()
    assert cli.main(["compare", str(other), str(loop)]) == 2
    assert capsys.readouterr().err == (f"ptd: error: ptd compare {loop}: cannot be opened (Too many levels of symbolic links); "
                                       f"give two finished run directories\n")
