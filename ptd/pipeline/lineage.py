"""Stage lineage: a finished stage's ``done`` record and the digests of the files it was made
from, checked before the stage is reused."""
from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

import torch.nn as nn

from ptd import paths as P
from ptd.train import checkpoint as ckpt
from ptd.errors import StaleStageError, one_line
from ptd.io import damaged, file_digest, parses


def is_done(d: Path) -> bool:
    return (d / P.DONE).is_file()


def mark_done(d: Path, inputs: dict[str, str] | None = None) -> None:
    """The stage's last write: when it finished and the digest of every file it was made from."""
    ckpt.write_json(d / P.DONE, {"finished": datetime.now(timezone.utc).isoformat(), "inputs": inputs or {}})


# ---------------------------------------------------------------- lineage
# A finished stage is reused on a re-run only while the files it was made from are the ones there
# now. A stage redone after its folder was deleted (on another thread count its weights differ) or
# a --teacher checkpoint replaced at the same path would otherwise leave later stages built from
# the old files, and the report would compare students of two different teachers.


def sources(model: nn.Module | None) -> tuple[Path, ...]:
    """The files ``model``'s weights (and masks) came from, as the stage that made it set them."""
    return tuple(getattr(model, "ptd_sources", ())) if model is not None else ()


def _input_key(run_dir: Path, path: Path) -> str:
    """Files of the run by their path inside it (the run directory may move); others absolute."""
    path = Path(path).absolute()
    try:
        return path.relative_to(Path(run_dir).absolute()).as_posix()
    except ValueError:
        return str(path)


# env.json's "done_format" (recorded by the session that started the run): 2 = every stage's
# ``done`` is the JSON object mark_done writes. Runs started by older ptd lack it and may hold bare
# markers (a timestamp, or nothing), which are read as "no recorded inputs".
DONE_FORMAT = 2


def strict_done(run_dir: Path) -> bool:
    """Whether every ``done`` of this run must be mark_done's JSON: the run was started by a ptd
    that writes nothing else. (A missing or damaged env.json: not strict; its reader reports it.)"""
    try:
        env = json.loads((Path(run_dir) / P.ENV).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(env, dict) and isinstance(env.get("done_format"), int) and env["done_format"] >= DONE_FORMAT


def recorded_inputs(d: Path, strict: bool = False) -> dict[str, str]:
    """What a finished stage's ``done`` says it was made from; {} for markers of older ptd versions
    (a bare timestamp, or empty): those stages are reused as before. A ``done`` that starts as the
    JSON object ptd writes but does not parse was cut short by something else: reading it as an
    old marker would switch the lineage check off for that stage for good, so it is refused; with
    ``strict`` (:func:`strict_done`: the run never had old markers) so is any ``done`` that is not
    that object, an emptied one included."""
    try:
        text = (d / P.DONE).read_text()
    except (OSError, UnicodeDecodeError):
        return {}
    try:
        obj = json.loads(text)
    except ValueError as e:
        if strict or text.lstrip().startswith("{"):
            why = "empty" if not text.strip() else f"not JSON: {type(e).__name__}: {one_line(e)}"
            raise damaged(d / P.DONE, why) from None
        return {}
    inputs = obj.get("inputs") if isinstance(obj, dict) else None
    if strict and not isinstance(inputs, dict):
        raise damaged(d / P.DONE, "not the record ptd writes (no inputs)")
    return {str(k): str(v) for k, v in inputs.items()} if isinstance(inputs, dict) else {}


def _input_path(run_dir: Path, key: str) -> Path:
    """The file a recorded input key names (the inverse of ``_input_key``)."""
    return Path(key) if os.path.isabs(key) else Path(run_dir) / key


def _changed_inputs(run_dir: Path, recorded: dict[str, str], missing_too: bool) -> list[tuple[Path, str]]:
    out = []
    for key, digest in recorded.items():
        path = _input_path(run_dir, key)
        now = file_digest(path) if path.is_file() else None
        # A file from outside the run (a user's --teacher) that has gone: the stage made from it
        # holds what it took (teacher/model.safetensors), and a user who moved their checkpoints
        # could neither resume nor grow a finished run. Replaced, it is still stale (below).
        if now is None and missing_too and os.path.isabs(key):
            continue
        if now is None and missing_too:
            out.append((path, "is missing now"))
        elif now is not None and now != digest and parses(path):  # a damaged file: its reader says so, precisely
            out.append((path, "has changed since"))
    return out


def _stale(stages: str, path: Path, what: str, fix: str, their: bool = False) -> StaleStageError:
    return StaleStageError(f"{stages} made from {path}, which {what} (the stage that writes it was redone, or the file "
                           f"replaced), so {'their' if their else 'its'} results belong to another run; "
                           f"{fix} to redo them from the file there now, or restore the file, or run into a new --out")


def check_inputs(run_dir: Path, d: Path) -> None:
    """Raise StaleStageError when a file the finished stage ``d`` was made from has changed or gone
    (gone: by now the stage that writes it has run, so it should be there)."""
    changed = _changed_inputs(run_dir, recorded_inputs(d, strict_done(run_dir)), missing_too=True)
    if changed:
        raise _stale(f"{d}: this finished stage was", *changed[0], f"delete it ({d}) and the stages after it")


def check_lineage(run_dir: Path) -> None:
    """Before a re-run writes anything: refuse when any finished stage was made from a file that is
    there now with other contents. (A missing one is left to ``check_inputs`` when that stage comes:
    the stage that writes it may be about to redo it, identically.)"""
    run_dir = Path(run_dir)
    strict = strict_done(run_dir)
    recorded = {m.parent: recorded_inputs(m.parent, strict) for m in sorted(run_dir.rglob(P.DONE))}
    stale = {d: c[0] for d, rec in recorded.items() if (c := _changed_inputs(run_dir, rec, missing_too=False))}
    if not stale:
        return
    first = next(iter(stale.values()))
    # ...and every stage made from a stale stage's files, transitively: all of them must be redone.
    grew = True
    while grew:
        grew = False
        for d, rec in recorded.items():
            if d not in stale and any(s in _input_path(run_dir, key).parents for key in rec for s in stale):
                stale[d], grew = first, True
    # Name whole stages: prune/ rather than each of its levels as well.
    tops = [d for d in stale if not any(o != d and o in d.parents for o in stale)]
    names = ", ".join(d.relative_to(run_dir).as_posix() for d in sorted(tops))
    many = len(tops) > 1
    raise _stale(f"{run_dir}: the finished stage{'s' if many else ''} {names} {'were' if many else 'was'}", *first,
                 f"delete {'those folders' if many else 'that folder'} (in {run_dir})", their=many)
