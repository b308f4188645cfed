"""``--from``: another run's finished teacher, pruning and control, checked and copied into a
new run directory."""
from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from ptd import paths as P
from ptd.config import REUSE_FREE, RunConfig, dump_yaml, reuse_free_text, to_dict
from ptd.train import checkpoint as ckpt
from ptd.errors import PreflightError
from ptd.io import dead_writer, read_yaml_mapping, seal, writer_tag
from ptd.pipeline.lineage import _changed_inputs, _stale, recorded_inputs, strict_done
from ptd.pipeline.rundir import (RunDirError, _EQUIVALENT, _diff, _recorded_paths, check_finished_stages, check_plugins_unchanged,
                                 check_run_config,
                                 make_dir)


# ---------------------------------------------------------------- --from: another run's teacher
# A question about the student side (another student.round_to, a named student, other distill
# settings) asked of the same pruned teacher: a finished run directory takes only growth (more
# seeds, arms, losses), so such a run goes into a new directory, and ``--from RUN`` copies RUN's
# finished teacher, pruning and control there instead of training them again. That is the same
# result only where those stages are what this config computes, so every key outside student,
# distill, name and sweep (and those a resume may change, _VOLATILE_KEYS) must be RUN's.

REUSED_STAGES = (P.TEACHER, P.PRUNE, P.CONTROL)


def _check_copied_from(src: Path, run_dir: Path) -> None:
    """``run_dir`` already holds a run: the same command again after a kill, or a growth, resumes it,
    when --from made it from ``src`` (its reused.json says so: the copy writes it before the run
    exists). Otherwise --from would be ignored without a word, and the user read the result as made
    from ``src``'s teacher (new-user audit): one line, nothing written."""
    from ptd.io import read_json_object

    rec = run_dir / P.REUSED
    if not rec.is_file():
        raise PreflightError(f"--from {src}: --out {run_dir} already holds a run, started without --from, so nothing would be "
                             f"copied; drop --from to resume or grow that run, or pass --out a new directory to copy {src}'s "
                             f"teacher and pruning into")
    was = read_json_object(rec, fix=f"restore it, or drop --from to resume {run_dir} as it is").get("from")
    if not isinstance(was, str) or Path(was) != src.resolve():
        raise PreflightError(f"--from {src}: --out {run_dir} already holds a run copied from {was}, not from {src.resolve()}; "
                             f"drop --from to resume or grow that run, or pass --out a new directory")


def check_reuse(cfg: RunConfig, src: str | Path, run_dir: str | Path) -> list[Path] | None:
    """The stage folders of ``src`` (relative to it) that ``--from src`` copies into ``run_dir``;
    None when ``run_dir`` already holds a run (a re-run after a kill resumes it: nothing to copy).
    A one-line PreflightError (or the damaged / stale file's error) where ``src`` cannot serve.
    Reads only."""
    src, run_dir = Path(src), Path(run_dir)
    a, b = src.resolve(), run_dir.resolve()
    if a == b or a in b.parents or b in a.parents:
        raise PreflightError(f"--from {src} and --out {run_dir} overlap; pass --out a new directory outside the run it reuses "
                             f"(more seeds, arms or losses grow a run in place: re-run it with its own --out, without --from)")
    if (run_dir / P.CONFIG).is_file():
        _check_copied_from(src, run_dir)
        return None
    check_run_config(cfg, run_dir)  # a non-empty folder that is not a run: refused as without --from, before any copy
    if not src.is_dir() or not (src / P.CONFIG).is_file():
        raise PreflightError(f"--from {src}: not a ptd run directory (no {P.CONFIG}); give the run directory whose teacher "
                             f"and pruning to reuse")
    old = _recorded_paths(src, read_yaml_mapping(src / P.CONFIG, fix="restore it, or run without --from"))
    new = to_dict(cfg)
    d = _diff({k: v for k, v in old.items() if k not in REUSE_FREE}, {k: v for k, v in new.items() if k not in REUSE_FREE},
              grows={"teacher.seeds": lambda x, y: True, **_EQUIVALENT})  # replicates it lacks are trained, extra ones left
    if d:
        raise PreflightError(f"--from {src}: its teacher and pruning were made with another config ({d}); --from reuses them "
                             f"only when every key outside {reuse_free_text()} is the same: set it back, or run "
                             f"without --from")
    copies = [(P.replicate_root(src, r) / name).relative_to(src) for r in range(cfg.teacher.seeds) for name in REUSED_STAGES
              if (P.replicate_root(src, r) / name / P.DONE).is_file()]
    if Path(P.TEACHER) not in copies:
        raise PreflightError(f"--from {src}: it has no finished teacher to reuse; finish it first (ptd train with --out {src}), "
                             f"or run without --from")
    _check_readable(src, copies)
    # Stages made by another version of a --plugin file (or with one this command lacks) would be
    # copied as if this one had made them: a re-run in place is refused for that, so is --from.
    check_plugins_unchanged(src, f"--from {src}", "run without --from")
    check_finished_stages(src, [src / c for c in copies])  # the records and weights parse
    strict = strict_done(src)
    for c in copies:  # and every file they were made from is the one there now
        for m in sorted((src / c).rglob(P.DONE)):
            changed = _changed_inputs(src, recorded_inputs(m.parent, strict), missing_too=True)
            if changed:
                raise _stale(f"--from {src}: its finished stage {m.parent} was", *changed[0],
                             f"re-run {src} with its own command")
    return copies


def _read_lock_source(src: Path) -> int | None:
    """``--from src``'s shared lock, held while ``check_reuse`` reads ``src`` and, taken again with a
    second ``check_reuse``, from there to the end of the copy: a ptd running in ``src`` (resuming it,
    redoing a stage made stale) could otherwise rewrite a stage between the check of its files and
    their copy, or halfway through it. Other ``--from`` copies of ``src`` share the lock. None where
    ``src`` is no folder (check_reuse names that)."""
    if not src.is_dir():
        return None
    try:
        fd = ckpt.read_lock_dir(src)
    except OSError:
        return None  # unreadable: check_reuse's one line says so
    if fd is None:
        raise RunDirError(f"--from {src}: another ptd process is running in it (it holds the directory's lock), and its "
                          f"stages may change under the copy; wait for it to finish (or stop it), then run this again")
    return fd


def _check_readable(src: Path, copies: Sequence[Path]) -> None:
    """Every file and folder ``--from`` copies can be read by this user: otherwise the copy would
    stop halfway at the first one, named as a list of errors (shutil.Error)."""
    for c in copies:
        for d in (src / c, src / P.TENSORBOARD / c):
            if not d.is_dir():
                continue
            for root, dirs, files in os.walk(d, onerror=lambda e: _unreadable(src, Path(e.filename or d))):
                for n in dirs:
                    if not os.access(Path(root) / n, os.R_OK | os.X_OK):
                        _unreadable(src, Path(root) / n)
                for n in files:
                    if not ckpt.is_writer_temp(n) and not os.access(Path(root) / n, os.R_OK):
                        _unreadable(src, Path(root) / n)


def _unreadable(src: Path, path: Path) -> None:
    raise PreflightError(f"--from {src}: {path} cannot be read by this user, so it cannot be copied; give this user read "
                         f"permission on it (chmod -R u+rX {src}), or run without --from")


def _reuse_temps(run_dir: Path) -> list[Path]:
    """Folders ``copy_reused`` left next to ``run_dir`` when killed (their process is gone)."""
    import glob

    return [t for t in run_dir.parent.glob(f".{glob.escape(run_dir.name)}.from-*.tmp")  # (a name may hold [, * or ?)
            if dead_writer(t.name[len(run_dir.name) + 7:-4])]


def copy_reused(cfg: RunConfig, src: str | Path, run_dir: str | Path, copies: Sequence[Path]) -> None:
    """Copy ``copies`` (from :func:`check_reuse`) and their TensorBoard mirrors from ``src`` into
    ``run_dir`` with this run's config.yaml and reused.json (where from, which stages). Atomic: the
    copy is made in a sibling folder renamed to ``run_dir`` (new, or empty) at the end, so a kill
    leaves ``run_dir`` as it was and the same command copies again (the killed copy's folder is
    removed then). ``src``'s own files are only read."""
    import shutil

    src, given = Path(src), Path(run_dir)
    # An --out that is a link to an (empty) folder: the copy replaces the folder it points to and
    # the link stays (os.replace over the link itself would fail: "Not a directory").
    run_dir = Path(os.path.realpath(given)) if given.is_symlink() else given
    make_dir(run_dir.parent, f"the folder of run directory {run_dir}")
    for t in _reuse_temps(run_dir):
        shutil.rmtree(t, ignore_errors=True)
    tmp = run_dir.parent / f".{run_dir.name}.from-{writer_tag()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)

    def skip(folder: str, names: list[str]) -> list[str]:  # a half-written file of a ptd killed (or running) there
        return [n for n in names if ckpt.is_writer_temp(n)]

    try:
        for c in copies:
            shutil.copytree(src / c, tmp / c, ignore=skip)
            if (src / P.TENSORBOARD / c).is_dir():
                shutil.copytree(src / P.TENSORBOARD / c, tmp / P.TENSORBOARD / c, ignore=skip)
        ckpt.write_json(tmp / P.REUSED, {"from": str(src.resolve()), "stages": [c.as_posix() for c in copies],
                                         "copied": datetime.now(timezone.utc).isoformat()})
        ckpt.write_text(tmp / P.CONFIG, seal(dump_yaml(cfg)))  # last: with it, tmp is a run directory
        if run_dir.is_dir():
            ckpt.remove_stale_temps(run_dir)  # empty but for a writer temporary (check_run_config took it)
            run_dir.rmdir()
        os.replace(tmp, run_dir)
    except shutil.Error as e:  # copytree's list of (source, destination, why), one per file it could not copy
        shutil.rmtree(tmp, ignore_errors=True)
        errors = e.args[0] if e.args and isinstance(e.args[0], list) and e.args[0] else [(src, tmp, str(e))]
        path, _, why = errors[0]
        more = f"; {len(errors) - 1} more" if len(errors) > 1 else ""
        raise RunDirError(f"--from {src}: {path} could not be copied ({why}{more}); {given} is left as it was: make it readable "
                          f"(chmod -R u+rX {src}) or free disk space, or run without --from") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
