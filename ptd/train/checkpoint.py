"""Checkpoints and every file ptd writes: atomic, durable, and instrumented for fault injection.

Weights go to safetensors (no code runs on load); a model file carries its architecture
(``ptd_spec``) as JSON in the metadata, so it can be rebuilt and loaded without anything else.

Every file write goes through ``_commit``: write a temporary file in the same folder, fsync it,
fsync the folder, ``os.replace`` it over the target, fsync the folder again. A kill at any moment
leaves the old file or the new one, never half of one, and a power cut cannot undo a rename that
returned. Removals go through ``remove`` the same way.

Crash consistency of training (one commit point per epoch): ``save_resume(out_dir, state)``
writes everything a resume needs -- unit weights, optimizer, scheduler, RNG states, hook and loss
states, the metrics rows, best-epoch info -- into ONE file that becomes visible by ONE rename.
The order a loop must keep, so that a kill between any two writes resumes identically:
  1. files the epoch produces besides the commit (best ``model.safetensors``, a hook's
     ``epoch_<e>.safetensors``), each atomic: a kill here re-runs the epoch, which rewrites them;
  2. ``save_resume`` -- the commit point;
  3. ``write_metrics`` -- a view of the committed rows, rewritten whole (a kill leaves it one
     epoch behind; the resume rewrites it from the committed rows).
At the end of a stage: its result files, then ``done``, then ``remove_resume`` (a kill before
``done`` resumes at the last epoch and only re-evaluates; never a retrain).

Fault injection, for tests (the writes are counted per process, from 1):
  PTD_FAULT_AT=<n>:<before|torn|after>   SIGKILL this process right before its n-th write, after
                                    its temporary is written but before the rename (a torn write:
                                    the state a kill mid-write leaves), or after the rename
  PTD_TRACE_WRITES=<path>           append "<n> <write|remove> <file>" per write to <path>
"""
from __future__ import annotations

import fcntl
import json
import os
import random
import re
import signal
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ptd import paths as P
from ptd.errors import PtdError, one_line
from ptd.io import damaged
from ptd.models import unwrap  # models sit below train: no import cycle

FAULT_ENV = "PTD_FAULT_AT"
TRACE_ENV = "PTD_TRACE_WRITES"
RESUME_FILE = P.RESUME
METRICS_FILE = P.METRICS
RESUME_FORMAT = "ptd-resume-1"


class CheckpointError(PtdError, ValueError):
    """A checkpoint that cannot be used; one-line message with the fix."""


# ---------------------------------------------------------------- the one writer

_writes = 0  # file writes (and removals) by this process so far


def write_count() -> int:
    """How many writes/removals this process has made through ``_commit``/``remove``."""
    return _writes


def _fault_plan() -> tuple[int, str] | None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    n, _, when = spec.partition(":")
    if not n.strip().isdigit() or when not in ("before", "torn", "after"):
        # A test harness typo must not silently run without faults.
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected <n>:<before|torn|after>, e.g. 3:after")
    return int(n), when


def _boundary(when: str, kind: str, path: Path) -> None:
    """Called right before, mid-way (temporary written, not renamed) and right after every write:
    trace it, and die here if asked to."""
    if when == "after":
        trace = os.environ.get(TRACE_ENV)
        if trace:
            with open(trace, "a") as f:  # the trace itself is not a counted write
                f.write(f"{_writes} {kind} {path}\n")
    plan = _fault_plan()
    if plan is not None and plan == (_writes, when):
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no atexit, no flush: a real crash


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(path: Path, write: Callable[[str], None]) -> None:
    """Write ``path`` atomically and durably through ``write(tmp_path)``; the one write path."""
    global _writes
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _writes += 1
    _boundary("before", "write", path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # the bytes are on disk before the name points at them
            os.fchmod(f.fileno(), _FILE_MODE)  # mkstemp makes 0600; a run directory is for sharing
            os.fsync(f.fileno())
        _fsync_dir(path.parent)
        _boundary("torn", "write", path)  # a kill here leaves the temporary behind, the target untouched
        os.replace(tmp, path)  # atomic on POSIX: a kill leaves the old file or the new, never half
        _fsync_dir(path.parent)  # the rename itself survives a power cut
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _boundary("after", "write", path)


def _file_mode() -> int:
    """0666 less the process umask: what open() would have given the file (mkstemp gives 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _file_mode()


def remove(path: str | Path) -> None:
    """Delete ``path`` if present (durably), as a counted write boundary."""
    global _writes
    path = Path(path)
    if not path.exists():
        return
    _writes += 1
    _boundary("before", "remove", path)
    path.unlink(missing_ok=True)  # under DDP another rank may have removed it already
    _fsync_dir(path.parent)
    _boundary("after", "remove", path)


_TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


def is_writer_temp(path: str | Path) -> bool:
    """Whether ``path`` is named as ``_commit``'s temporaries are: ``.<name>.<8 random>.tmp``
    (mkstemp's 8 characters from [a-z0-9_]), so no other file a user keeps there matches."""
    return _TEMP_NAME.fullmatch(Path(path).name) is not None


def remove_stale_temps(root: str | Path) -> int:
    """Delete every writer temporary (``.<name>.<random>.tmp``) under ``root``; returns how many.

    Only a writer killed between its write and its rename leaves one behind, and no rename can
    follow once that process is dead: with the run directory locked (``lock_dir``) every one found
    is garbage. Done once when a run opens its directory, so no kill, in any stage, can leave
    a stray file in a finished run."""
    found = sorted(p for p in Path(root).rglob(".*.tmp") if is_writer_temp(p)) if Path(root).is_dir() else []
    for tmp in found:
        remove(tmp)
    return len(found)


# ---------------------------------------------------------------- one process per run directory

_DIR_LOCKS: dict[str, int] = {}  # resolved directory -> the open descriptor holding its flock


def lock_dir(path: str | Path) -> bool:
    """Take an exclusive advisory lock on directory ``path`` (flock on the directory itself, so no
    lock file to leave behind); False when another process holds it. The kernel drops the lock
    when the holder exits, killed or not, so a crashed run never blocks its own re-run.
    Re-entrant within one process; released by ``unlock_dir``."""
    key = str(Path(path).resolve())
    if key in _DIR_LOCKS:
        return True
    fd = os.open(key, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    _DIR_LOCKS[key] = fd
    return True


def unlock_dir(path: str | Path) -> None:
    """Release ``lock_dir``'s lock on ``path`` (no-op when this process does not hold it)."""
    fd = _DIR_LOCKS.pop(str(Path(path).resolve()), None)
    if fd is not None:
        os.close(fd)  # closing the last descriptor of the open file releases the flock


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    _commit(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors ptd saved in a run directory (masks); a damaged file is a one-line DamagedFileError."""
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise damaged(path, "missing") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise damaged(path, f"not safetensors: {one_line(e)}") from None


def write_json(path: str | Path, obj: Any) -> None:
    def w(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False, default=str)
            f.write("\n")

    _commit(Path(path), w)


def write_text(path: str | Path, text: str) -> None:
    def w(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    _commit(Path(path), w)


def save_model(path: str | Path, model: nn.Module, extra: dict[str, Any] | None = None) -> None:
    """State dict (contiguous CPU copies) + the architecture spec as metadata."""
    model = unwrap(model)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": "ptd-model-1"}
    if getattr(model, "ptd_spec", None) is not None:
        meta["ptd_spec"] = json.dumps(model.ptd_spec, sort_keys=True)
    for k, v in (extra or {}).items():
        meta[k] = json.dumps(v)
    save_tensors(path, sd, meta)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors metadata of ``path``; a one-line CheckpointError when it is missing or not safetensors."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        what = "is a folder" if p.is_dir() else "not found"
        raise CheckpointError(f"checkpoint {what}: {p}; give the path of a .safetensors file written by ptd (e.g. runs/<name>/teacher/model.safetensors)")
    try:
        with safe_open(str(p), "pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:  # garbage, truncated, unreadable (permissions)
        raise CheckpointError(f"{p}: not a readable safetensors file ({one_line(e)[:160]}); give a .safetensors file written by ptd "
                              f"(e.g. runs/<name>/teacher/model.safetensors)") from None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from a .safetensors file or a torch file (weights_only=True: no code from the file runs)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}; give the path of a .safetensors or .pt file")
    if p.suffix == ".safetensors":
        try:
            return load_file(str(p))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{p}: not a readable safetensors file ({str(e).splitlines()[0]}); re-export it with safetensors.torch.save_file") from None
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors come in many types; all mean the same to the user
        raise CheckpointError(f"{p}: cannot be read as a weights-only torch checkpoint ({str(e).splitlines()[0][:160]}); save a plain state_dict with torch.save(model.state_dict(), path) or use .safetensors") from None
    for key in ("state_dict", "model", "model_state_dict", "net"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{p}: holds no state_dict of tensors; save torch.save(model.state_dict(), path)")
    # Checkpoints saved from DDP or torch.compile carry prefixes the bare model does not have.
    out = {}
    for k, v in obj.items():
        for pre in ("module.", "_orig_mod."):
            if k.startswith(pre):
                k = k[len(pre):]
        out[k] = v
    return out


def load_into(model: nn.Module, path: str | Path, what: str = "model") -> None:
    """Load weights into ``model``, or raise a one-line CheckpointError saying what does not fit."""
    model = unwrap(model)
    sd = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        arch = getattr(model, "ptd_spec", {}).get("arch", type(model).__name__)
        detail = []
        if wrong:
            detail.append(f"{len(wrong)} shape mismatches (first: {wrong[0]})")
        if missing:
            detail.append(f"{len(missing)} missing keys (first: {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected keys (first: {unexpected[0]})")
        meta_arch = ""
        if Path(path).suffix == ".safetensors":
            spec = read_metadata(path).get("ptd_spec")
            if spec:
                meta_arch = f" (the file says it holds {json.loads(spec).get('arch')})"
        raise CheckpointError(
            f"{path}: does not fit the {what} architecture {arch}{meta_arch}: {'; '.join(detail)}; "
            f"set the {what}'s model (arch/width/kwargs) to the one the checkpoint was trained with"
        )
    # A file of nan/inf weights (a diverged run's, or a damaged one) loads without complaint and
    # teaches garbage for hours. Parameters and BatchNorm statistics are always finite in a model
    # worth loading; other buffers (masks, indices) are left alone.
    stats = {n for n, _ in model.named_parameters()} | {k for k in own if k.endswith(("running_mean", "running_var"))}
    bad = [k for k in own if k in stats and sd[k].is_floating_point() and not bool(torch.isfinite(sd[k]).all())]
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} tensors hold nan or inf values (first: {bad[0]}): not a usable {what}; "
                              f"did the run that wrote it diverge? give the checkpoint of a run whose loss stayed finite")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()})


def load_model(path: str | Path) -> nn.Module:
    """Rebuild a model from a ptd safetensors file (architecture from its metadata) and load it."""
    from ptd.models import build_from_spec

    meta = read_metadata(path)
    if "ptd_spec" not in meta:
        raise CheckpointError(f"{path}: carries no ptd architecture metadata; load it into a model you build (ptd.train.checkpoint.load_into)")
    try:
        spec = json.loads(meta["ptd_spec"])
        model = build_from_spec(spec)
    except PtdError:
        raise
    except (ValueError, TypeError, KeyError) as e:  # a spec from another ptd version, or edited by hand
        raise CheckpointError(f"{path}: its ptd architecture metadata does not build a model ({one_line(e)[:160]}); "
                              f"load the weights into a model you build (ptd.train.checkpoint.load_into)") from None
    load_into(model, path)
    return model


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    _commit(Path(path), lambda tmp: torch.save(state, tmp))


def load_state(path: str | Path) -> dict[str, Any]:
    return torch.load(str(path), map_location="cpu", weights_only=True)


# ---------------------------------------------------------------- the per-epoch commit point


def rng_state() -> dict[str, Any]:
    """Every RNG a training epoch may draw from, in a form ``torch.load(weights_only=True)`` reads."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    st: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    if "python" in st:
        py = st["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
    if "numpy" in st:
        n = st["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_resume(out_dir: str | Path, state: dict[str, Any]) -> None:
    """Commit one epoch: ``state`` becomes visible in ``out_dir/resume.pt`` by ONE atomic rename.

    ``state`` is a dict of tensors, numbers, strings, lists and dicts (what ``weights_only=True``
    reads back), holding everything a resume needs: by convention ``epoch`` (0-based, the epoch
    just finished), ``model`` (the unit's state dict: student + loss modules), ``optimizer``,
    ``scheduler``, ``rng`` (``rng_state()``), ``hooks``, ``losses``, ``metrics`` (every row so
    far), ``best`` ({epoch, acc}), ``steps``, ``wall_s``. Tensors are copied to the CPU first so
    the file loads on any device.
    """
    if not isinstance(state, dict):
        raise TypeError("save_resume: state must be a dict")
    state = {**_to_cpu(state), "format": RESUME_FORMAT}
    _commit(Path(out_dir) / RESUME_FILE, lambda tmp: torch.save(state, tmp))


def load_resume(out_dir: str | Path) -> dict[str, Any] | None:
    """The last committed epoch's state from ``out_dir/resume.pt``, or None when there is none.

    Read with ``weights_only=True``: no code from the file runs. A file that is not a ptd resume
    commit (it cannot be torn: commits are atomic) is a one-line CheckpointError with the fix.
    """
    p = Path(out_dir) / RESUME_FILE
    if not p.is_file():
        return None
    fix = f"delete {p} to restart this stage from its first epoch"
    try:
        state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling fails in many types; all mean "not a resume file"
        raise CheckpointError(f"{p}: not a readable ptd resume file ({str(e).splitlines()[0][:160] if str(e) else type(e).__name__}); {fix}") from None
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        raise CheckpointError(f"{p}: not a ptd resume file (format {state.get('format') if isinstance(state, dict) else type(state).__name__!r}); {fix}")
    return state


def remove_resume(out_dir: str | Path) -> None:
    """Drop the resume commit (and an older ptd's two-file one) once the stage's ``done`` is written."""
    for name in (RESUME_FILE, *P.LEGACY_RESUME):
        remove(Path(out_dir) / name)
    # A kill in the middle of a write leaves its temporary (never a half target): drop them too.
    for tmp in sorted(Path(out_dir).glob(".*.tmp")) if Path(out_dir).is_dir() else ():
        if is_writer_temp(tmp):
            remove(tmp)


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_cpu(v) for v in obj)
    return obj


# ---------------------------------------------------------------- metrics.jsonl, a view of the commit


def write_metrics(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite metrics.jsonl whole from the committed rows (atomic: never a torn line)."""
    _commit(Path(path), lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in rows)))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl; [] when missing. A torn or partial LAST line (a kill mid-append
    by an older ptd, or a full disk) is dropped; a bad line before the last is a CheckpointError."""
    p = Path(path)
    if not p.is_file():
        return []
    lines = p.read_text(errors="replace").splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not an object")
        except ValueError as e:
            if i == len(lines) - 1:
                break  # torn tail: the epoch it belonged to was never committed
            raise CheckpointError(f"{p}: line {i + 1} is not a JSON object ({e}); delete the line, or the file to rebuild it on resume") from None
        rows.append(row)
    return rows
