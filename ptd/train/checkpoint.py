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
  1. files the epoch produces besides the commit (a hook's ``epoch_<e>.safetensors``), each
     atomic: a kill here re-runs the epoch, which rewrites them;
  2. ``save_resume`` -- the commit point;
  3. the kept ``model.safetensors`` when the epoch is the best: after the commit, so it always
     holds weights the record scored (a resume whose commit is the best epoch saves it again);
  4. ``write_metrics`` -- a view of the committed rows, rewritten whole (a kill leaves it one
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

import contextlib
import fcntl
import io
import json
import math
import os
import pickle
import random
import re
import signal
import stat
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors

from ptd import paths as P
from ptd.errors import PtdError, counted, one_line
from ptd.io import damaged, safetensors_header
from ptd.models import unwrap  # models sit below train: no import cycle

FAULT_ENV = "PTD_FAULT_AT"
TRACE_ENV = "PTD_TRACE_WRITES"
RESUME_FILE = P.RESUME
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
        try:
            write(tmp)
        except OSError as e:
            if e.filename is None:  # a write() that failed (disk full) names no file: the one it was for
                e.filename = str(path)
            raise
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


def finite_names(model: nn.Module) -> set[str]:
    """The state_dict names that are finite in any model worth keeping: its parameters and its
    BatchNorm running statistics. Other buffers (masks, indices, a -inf attention mask) may hold
    anything. One rule for the loader (``load_into``) and the divergence check of training
    (ptd.train.loop), so a model training commits is one the loader takes."""
    return {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers() if n.endswith(("running_mean", "running_var"))}


def holds_lock(path: str | Path) -> bool:
    """Whether this process holds ``path``'s lock (``lock_dir``)."""
    return str(Path(path).resolve()) in _DIR_LOCKS


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


def read_lock_dir(path: str | Path) -> int | None:
    """A shared advisory lock on directory ``path`` for a reader that must see no writer's half
    work (``--from`` copying another run's stages): any number of readers hold it together, and
    it excludes ``lock_dir``'s holder, a ptd running in that directory. Returns the descriptor to
    pass to ``read_unlock_dir``; None when a writer holds the directory."""
    fd = os.open(str(Path(path).resolve()), os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def read_unlock_dir(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def unlock_dir(path: str | Path) -> None:
    """Release ``lock_dir``'s lock on ``path`` (no-op when this process does not hold it)."""
    fd = _DIR_LOCKS.pop(str(Path(path).resolve()), None)
    if fd is not None:
        os.close(fd)  # closing the last descriptor of the open file releases the flock


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    # Serialized in memory and written by Python's file I/O, as every writer of _commit does: a full
    # disk is then an OSError (ENOSPC), which the CLI says in one line. safetensors' own file writer
    # raised SafetensorError ("I/O error: No space left on device") and torch.save a RuntimeError
    # ("unexpected pos"), both reported as a bug in ptd (crash audit, 3 of 3 disk-full runs).
    write_bytes(path, canonical_safetensors(save_safetensors(tensors, metadata=metadata)))


def canonical_safetensors(raw: bytes) -> bytes:
    """A safetensors file's bytes with the metadata keys of its header sorted, so the same tensors
    and metadata always give the same bytes.

    safetensors writes the metadata map in a hash map's order, seeded per process: a teacher
    retrained bit for bit gave a file that differed in bytes (measured), which misleads anyone
    comparing run directories by hash. The tensors' entries are already in a fixed order. The
    header is re-encoded compactly as the writer does; where that changes its length (never seen
    from safetensors itself) the data simply follows the new header."""
    f = io.BytesIO(raw)
    header = safetensors_header(f, len(raw))
    n = f.tell() - 8
    meta = (header or {}).get("__metadata__")
    if not meta:
        return raw
    header = {"__metadata__": dict(sorted(meta.items())), **{k: v for k, v in header.items() if k != "__metadata__"}}
    new = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    new += b" " * (-len(new) % 8)  # the format pads the header with spaces to 8 bytes
    return len(new).to_bytes(8, "little") + new + raw[8 + n:]


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


def write_bytes(path: str | Path, data: bytes | memoryview) -> None:
    """``data`` into ``path`` through the same atomic commit as every other run-directory file."""
    _commit(Path(path), lambda tmp: Path(tmp).write_bytes(data))


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
    if getattr(model, "ptd_input_size", None) is not None:  # (height, width) it was trained at: eval and export use it
        meta["input_size"] = json.dumps([int(s) for s in model.ptd_input_size])
    if getattr(model, "ptd_classes", None) is not None:  # the class of each output, in order: eval checks its data's
        meta["classes"] = json.dumps([str(c) for c in model.ptd_classes])
    if getattr(model, "ptd_normalize", None) is not None:  # per-channel mean and std of its inputs (0..1 scale)
        meta["normalize"] = json.dumps(model.ptd_normalize, sort_keys=True)
    for k, v in (extra or {}).items():
        meta[k] = json.dumps(v)
    save_tensors(path, sd, meta)


# ---------------------------------------------------------------- files a user hands ptd as a checkpoint
#
# `--teacher`, `ptd eval FILE` and `ptd export FILE` read a file from anywhere. Every way such a
# file can be wrong -- a path that is no file, a file this user cannot read, one cut short, one
# of another format, a pickle that would run code, metadata that builds no model -- is one
# CheckpointError line naming the file and the fix. The file's first bytes decide how it is
# read (not its name), so each loader only ever sees the format it parses.

_MODEL_FILE = "give a .safetensors file written by ptd (e.g. runs/<name>/teacher/model.safetensors)"
_WEIGHTS_FILE = "give a .safetensors file or a torch.save(model.state_dict(), path) file"
_RESAVE = "an interrupted save or copy leaves this: save or copy it again"
_HEAD = 64  # bytes read to tell the formats apart

# Bounds on a ptd_spec's numbers, checked before anything is built: a model file's metadata is
# text anyone can edit, and a negative or absurd size otherwise reaches torch's allocator.
MAX_SPEC_CLASSES = 1_000_000
MAX_SPEC_IN_CHANNELS = 1024
MAX_SPEC_WIDTH = 1024.0
MAX_SPEC_INT = 2**31 - 1


def stat_regular(p: Path, give: str) -> int:
    """The size of ``p``; a CheckpointError for every way ``p`` is not a regular file one can stat."""
    try:
        st = os.stat(p)
    except FileNotFoundError:
        if os.path.lexists(p):  # a link whose target is gone reads as missing; say which link
            raise CheckpointError(f"checkpoint not found: {p} is a symbolic link to {os.readlink(p)}, which does not exist; "
                                  f"fix the link or {give}") from None
        raise CheckpointError(f"checkpoint not found: {p}; {give}") from None
    except PermissionError:
        raise CheckpointError(f"{p}: permission denied (a folder above it cannot be searched by this user); "
                              f"give this user access to it, or copy the file somewhere readable") from None
    except OSError as e:  # a link loop, a name too long, a file where a folder belongs
        raise CheckpointError(f"{p}: cannot be opened ({e.strerror or type(e).__name__}); {give}") from None
    if stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"checkpoint not found: {p} is a folder, not a file; {give}")
    if not stat.S_ISREG(st.st_mode):  # a pipe would block the read forever; a device is no checkpoint
        raise CheckpointError(f"{p}: not a regular file (a pipe, socket or device); {give}")
    return st.st_size


def _is_text(head: bytes) -> bool:
    """Printable UTF-8 (a multi-byte character cut by the read allowed at the end)."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:
            return False
        text = head[:e.start].decode("utf-8")
    return all(c.isprintable() or c in "\t\n\r\f\v" for c in text)


def _kind(head: bytes, size: int) -> str:
    """What the first bytes say the file is: empty, safetensors, zip, pickle, text or unknown."""
    if size == 0:
        return "empty"
    if head[8:9] == b"{":  # 8-byte little-endian header length, then a JSON object
        return "safetensors"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):  # torch.save's default format is a zip archive
        return "zip"
    if head[:1] == b"\x80" and head[1:2] and 2 <= head[1] <= 5:  # a binary pickle (torch's legacy format)
        return "pickle"
    return "text" if _is_text(head) else "unknown"


def _torch_zip(p: Path) -> bool:
    """Whether the zip archive at ``p`` is torch.save's (its pickle is <name>/data.pkl); read, not loaded."""
    try:
        with zipfile.ZipFile(p) as z:
            return any(n.endswith("/data.pkl") or n == "data.pkl" for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def sniff_file(p: Path, give: str) -> tuple[str, int, bytes]:
    """(kind, size, first bytes) of the file at ``p``; CheckpointError when it cannot be read at all."""
    size = stat_regular(p, give)
    try:
        with open(p, "rb") as f:
            head = f.read(_HEAD)
    except PermissionError:
        raise CheckpointError(f"{p}: permission denied: this user cannot read it; give read permission (chmod u+r) "
                              f"or copy it somewhere readable") from None
    except OSError as e:
        raise CheckpointError(f"{p}: cannot be read ({e.strerror or type(e).__name__}); {give}") from None
    kind = _kind(head, size)
    if kind == "empty":
        raise CheckpointError(f"{p}: empty (0 bytes), not a checkpoint; {_RESAVE}")
    if kind == "safetensors" and 8 + int.from_bytes(head[:8], "little") > size:
        raise CheckpointError(f"{p}: truncated or damaged: {size:,} bytes, but its safetensors header says the header "
                              f"alone is {int.from_bytes(head[:8], 'little'):,}; {_RESAVE}")
    if kind in ("text", "unknown"):
        what = f"it holds text ({head[:24].decode('utf-8', 'replace')!r}...)" if kind == "text" else \
            f"its first bytes ({head[:8].hex()}) are neither safetensors, a torch zip nor a pickle"
        raise CheckpointError(f"{p}: not a readable safetensors file or weights-only torch checkpoint: {what}; {give}")
    return kind, size, head


def clip_words(text: str, limit: int) -> str:
    """``text`` cut at a word boundary to at most about ``limit`` characters, marked when cut."""
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0].rstrip(",;:") + " ..."


def _first_sentence(e: BaseException, limit: int = 120) -> str:
    """An exception's first sentence, whole: long library messages are not cut mid-word."""
    return clip_words((one_line(e) or type(e).__name__).split(". ")[0], limit)


def _safetensors_error(p: Path, e: BaseException, fix: str) -> CheckpointError:
    msg = one_line(e)
    if "incomplete metadata" in msg or "not fully covered" in msg:  # the data ends before the header says it does
        return CheckpointError(f"{p}: not a readable safetensors file (truncated: it ends before the data its header describes); {_RESAVE}")
    if isinstance(e, PermissionError):
        return CheckpointError(f"{p}: permission denied: this user cannot read it; give read permission (chmod u+r) "
                               f"or copy it somewhere readable")
    return CheckpointError(f"{p}: not a readable safetensors file ({_first_sentence(e, 160)}); {fix}")


def _torch_zip_check(p: Path) -> None:
    """A zip archive is a torch checkpoint only if it holds a data.pkl; a cut one has no directory."""
    try:
        with zipfile.ZipFile(p) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        raise CheckpointError(f"{p}: truncated or damaged: a zip archive (torch's format) without a readable "
                              f"directory; {_RESAVE}") from None
    if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        raise CheckpointError(f"{p}: a zip archive of {len(names)} files, not a torch checkpoint (no data.pkl in it); "
                              f"{_WEIGHTS_FILE}")


# What torch (and struct, under its legacy reader) say about a file that ends early or is garbled.
_CUT_SHORT = ("EOF", "truncated", "corrupted", "central directory", "unpack requires a buffer")
_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _torch_load(p: Path) -> Any:
    """torch.load with weights_only=True (no code from the file runs), every failure one line."""
    try:
        # A file object, not the path: torch.load hands a path named *.safetensors to safetensors,
        # whatever the bytes say. No warnings: "Detected pickle protocol" would be a second line.
        with open(p, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise CheckpointError(f"{p}: truncated or damaged pickle ({_first_sentence(e)}); {_RESAVE}") from None
        named = _REFUSED_GLOBAL.search(str(e))
        refers = f" (it refers to {named.group(1)})" if named else ""
        raise CheckpointError(f"{p}: refused by the weights-only loader: holds pickled Python objects that could run code{refers}; "
                              f"ptd loads only tensors: save a state_dict with torch.save(model.state_dict()) or use safetensors") from None
    except EOFError:
        raise CheckpointError(f"{p}: truncated: the pickle ends early; {_RESAVE}") from None
    except Exception as e:  # noqa: BLE001 -- torch reports a damaged file in many types; all mean the same to the user
        if any(m in one_line(e) for m in _CUT_SHORT):
            raise CheckpointError(f"{p}: truncated or damaged torch checkpoint ({_first_sentence(e)}); {_RESAVE}") from None
        raise CheckpointError(f"{p}: cannot be read as a weights-only torch checkpoint ({type(e).__name__}: {_first_sentence(e)}); "
                              f"{_WEIGHTS_FILE}") from None


def read_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors metadata of ``path``; a one-line CheckpointError when it cannot be read or is not safetensors."""
    from safetensors import safe_open

    p = Path(path)
    kind, _, _ = sniff_file(p, _MODEL_FILE)
    if kind != "safetensors":
        what = "a zip archive but not a whole torch.save one (another tool's, or cut short), and not safetensors" if kind == "zip" and not _torch_zip(p) else \
            "a pickle file (torch.save's format), not safetensors"
        raise CheckpointError(f"{p}: {what}: ptd rebuilds a model only from the architecture a ptd model file carries; "
                              f"{_MODEL_FILE}")
    try:
        with safe_open(str(p), "pt") as f:
            return f.metadata() or {}
    except Exception as e:  # noqa: BLE001 -- safetensors runs no code: whatever it raises is about the file
        raise _safetensors_error(p, e, _MODEL_FILE) from None


# The types a tensor of values can have in a file a user hands ptd: torch reads, compares and
# casts every one of them. Not here: quantized types (qint8...), which hold integers plus a scale,
# and the bit-packed ones (bits8, int1..7, uint1..7, float4), which no cast or comparison takes.
_VALUE_DTYPES = frozenset(d for d in (
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
    getattr(torch, "uint16", None), getattr(torch, "uint32", None), getattr(torch, "uint64", None),
    torch.float16, torch.bfloat16, torch.float32, torch.float64,
    *(getattr(torch, f"float8_{n}", None) for n in ("e5m2", "e4m3fn", "e5m2fnuz", "e4m3fnuz", "e8m0fnu")),
    torch.complex32, torch.complex64, torch.complex128) if d is not None)


def _odd_tensor(t: torch.Tensor) -> tuple[str, str] | None:
    """(what ``t`` is, how to save it instead) when it is not a dense tensor of values in memory;
    None for one every check and cast of ``load_into`` takes."""
    if t.is_nested:  # (its .shape raises)
        return "a nested tensor", "save one dense tensor per weight, as torch.save(model.state_dict(), path) does"
    if t.layout != torch.strided:
        return f"sparse (layout {t.layout})", "convert each with tensor.to_dense() and save again"
    if t.device.type != "cpu":  # map_location="cpu" moves every real device; the meta device holds no values
        return (("on the meta device: a shape without values", "save the state_dict of a model whose weights were trained "
                 "or loaded, not of one built on the meta device") if t.device.type == "meta"
                else (f"on device {t.device}", "move each to the CPU (tensor.cpu()) and save again"))
    if t.is_quantized:
        return f"quantized ({t.dtype})", "convert each back to floats with tensor.dequantize() and save again"
    if t.dtype not in _VALUE_DTYPES:
        return f"of the packed type {t.dtype}", "cast each to float32 and save again"
    return None


def _check_tensors(p: Path, sd: dict[str, torch.Tensor]) -> None:
    """Refuse, in one line naming the first, every tensor of ``sd`` that is not a dense CPU tensor of
    values: checked all at once, before anything is compared or copied, so no torch op later
    meets a sparse, meta, quantized or packed tensor (each raised its own internal error)."""
    odd = [(k, why) for k, v in sd.items() if (why := _odd_tensor(v)) is not None]
    if odd:
        (k, (what, fix)), n = odd[0], len(odd)
        raise CheckpointError(f"{p}: {counted(n, 'tensor')} {'is' if n == 1 else 'are'} not a dense tensor of values (first: {clip_words(k, 120)}, "
                              f"{what}); ptd loads only dense tensors of values: {fix}")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from a safetensors file or a torch file, told apart by their bytes (weights_only=True:
    no code from the file runs)."""
    p = Path(path)
    kind, _, _ = sniff_file(p, _WEIGHTS_FILE)
    if kind == "safetensors":
        try:
            sd = load_file(str(p))
        except Exception as e:  # noqa: BLE001 -- safetensors runs no code: whatever it raises is about the file
            raise _safetensors_error(p, e, "re-export it with safetensors.torch.save_file") from None
        _check_tensors(p, sd)  # safetensors has 4- and 8-bit types too
        return sd
    if kind == "zip":
        _torch_zip_check(p)
    obj = _torch_load(p)
    for key in ("state_dict", "model", "model_state_dict", "net"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{p}: holds no state_dict of tensors; save torch.save(model.state_dict(), path)")
    names = [k for k in obj if not isinstance(k, str)]
    if names:  # torch.save keeps any hashable key; a state_dict's keys are parameter names
        raise CheckpointError(f"{p}: {len(names)} of its {len(obj)} keys are not names (first: {clip_words(one_line(repr(names[0])), 60)}, "
                              f"of type {type(names[0]).__name__}); a state_dict maps names such as 'features.0.weight' to tensors: "
                              f"save torch.save(model.state_dict(), path)")
    _check_tensors(p, obj)
    # Checkpoints saved from DDP or torch.compile carry prefixes the bare model does not have.
    out: dict[str, torch.Tensor] = {}
    given: dict[str, str] = {}  # stripped name -> the file's own
    for k, v in obj.items():
        name = k
        for pre in ("module.", "_orig_mod."):
            if name.startswith(pre):
                name = name[len(pre):]
        if name in given:  # 'module.x' beside 'x': which one is the weight cannot be told; keeping the last was silent
            raise CheckpointError(f"{p}: holds both {clip_words(given[name], 80)!r} and {clip_words(k, 80)!r}, the same weight once the "
                                  f"DDP/torch.compile prefix is dropped; save one model's state_dict (of the bare model, "
                                  f"model.module.state_dict() under DDP)")
        given[name] = k
        out[name] = v
    return out


def _file_arch(path: str | Path) -> str:
    """' (the file says it holds <arch>)' for a ptd model file, '' for anything else."""
    try:
        spec = json.loads(read_metadata(path).get("ptd_spec", "null"))
    except (CheckpointError, ValueError, RecursionError):
        return ""
    return f" (the file says it holds {clip_words(str(spec.get('arch')), 60)})" if isinstance(spec, dict) else ""


def _head_only(model: nn.Module, sd: dict, own: dict, missing: list, unexpected: list) -> tuple[str, int, int] | None:
    """(layer, the file's outputs, the model's) when the one mismatch is the output layer's class
    count (an ImageNet-pretrained torchvision state dict for a 5-class dataset); else None. The
    generic message then told the user to change the architecture, which cannot help."""
    if missing or unexpected:
        return None
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        return None
    wrong = {k for k in own if k in sd and sd[k].shape != own[k].shape}
    # Every mismatch a Linear's outputs (the classifier, and GoogLeNet's or Inception's auxiliary
    # ones), the file's all one class count and the model's another.
    heads = sorted({k.rpartition(".")[0] for k in wrong})
    if not wrong or any(h not in linears or f"{h}.weight" not in wrong for h in heads) \
            or not wrong <= {f"{h}.{p}" for h in heads for p in ("weight", "bias")}:
        return None
    ws = [(sd[f"{h}.weight"], own[f"{h}.weight"]) for h in heads]
    if any(a.dim() != 2 or a.shape[1] != b.shape[1] for a, b in ws) or len({int(a.shape[0]) for a, _ in ws}) != 1 \
            or len({int(b.shape[0]) for _, b in ws}) != 1:
        return None
    layer = next((n for n in reversed(linears) if n in heads), heads[-1])
    return layer, int(ws[0][0].shape[0]), int(ws[0][1].shape[0])


def _namesake(model: nn.Module, sd: dict) -> str | None:
    """The other of ptd's and torchvision's model of the same name (``resnet18`` and ``tv:resnet18``)
    when the file fits it exactly, else None. A torchvision ResNet-18's state dict given for
    ``arch: resnet18`` was told "1 shape mismatches; 18 missing keys; 18 unexpected keys; set the
    teacher's model to the one the checkpoint was trained with" (new-user trial): it was trained
    with the name the user had set, of the other library. Built only on this error path."""
    from ptd.models import build_model

    spec = getattr(model, "ptd_spec", None)
    if not isinstance(spec, dict) or not isinstance(spec.get("arch"), str):
        return None
    arch = spec["arch"]
    other = arch[3:] if arch.startswith("tv:") else f"tv:{arch}"
    try:
        twin = build_model(other, num_classes=spec["num_classes"], in_channels=spec.get("in_channels", 3),
                           width=spec.get("width", 1.0)).state_dict()
    except Exception:  # no such model in the other library, or it takes no such width: no hint
        return None
    fits = twin.keys() == sd.keys() and all(twin[k].shape == sd[k].shape for k in twin)
    return other if fits else None


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
            detail.append(f"{len(wrong)} shape mismatches (first: {clip_words(wrong[0], 120)})")
        if missing:
            detail.append(f"{len(missing)} missing keys (first: {clip_words(missing[0], 120)})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected keys (first: {clip_words(unexpected[0], 120)})")
        head = _head_only(model, sd, own, missing, unexpected)
        if head is not None:  # all that differs is the class count: no model setting can fix that
            raise CheckpointError(
                f"{path}: its classifier ({head[0]}) has {head[1]} outputs, but the data has {head[2]} classes (ptd takes the "
                f"class count from the data; the rest of the {what} fits {arch}); give a checkpoint trained on this data's "
                f"{head[2]} classes (a pretrained model fine-tuned with a new {head[2]}-class head first), or train the {what} here"
            )
        twin = _namesake(model, sd)
        if twin is not None:
            lib = "torchvision's" if twin.startswith("tv:") else "ptd's own"
            raise CheckpointError(
                f"{path}: does not fit the {what} architecture {arch} ({'; '.join(detail)}), but fits {twin}, {lib} "
                f"model of that name, exactly; "
                + (f"set teacher.model.arch={twin}" if what == "teacher" else f"build the {what} as {twin}")
            )
        children = {n for n, _ in model.named_children()}
        if unexpected and not missing and not wrong and not {k.partition(".")[0] for k in unexpected} & children:
            # Every weight the model has is in the file, with its shape, and the rest sits under modules
            # the model does not have (an auxiliary head, an EMA copy): the fix is the file, not another
            # architecture (which the line below asks for). Extra tensors inside the model's own modules
            # (a ResNet-34's layer1.2 given for a ResNet-18) are another architecture: the line below.
            raise CheckpointError(
                f"{path}: holds every weight of the {what} architecture {arch}, and tensors it does not have "
                f"({len(unexpected)}, first: {clip_words(unexpected[0], 120)}); save only the model's own weights "
                f"(torch.save(model.state_dict()) of the model without them), or set the {what}'s model to one that has them"
            )
        raise CheckpointError(
            f"{path}: does not fit the {what} architecture {arch}{_file_arch(path)}: {'; '.join(detail)}; "
            f"set the {what}'s model (arch/width/kwargs) to the one the checkpoint was trained with"
        )
    # The cast below would drop a complex tensor's imaginary parts (with a warning on stderr), and
    # turn bool or integer "weights" into floats of 0/1 or whole numbers: garbage, loaded without a
    # word. An integer buffer (BatchNorm's num_batches_tracked) takes any real type, as it always did.
    odd = [f"{k} ({sd[k].dtype}, where the {what} holds {own[k].dtype})" for k in own
           if (sd[k].is_complex() and not own[k].is_complex()) or (own[k].is_floating_point() and not sd[k].is_floating_point())]
    if odd:
        raise CheckpointError(f"{path}: {counted(len(odd), 'tensor')} {'has' if len(odd) == 1 else 'have'} a type a {what} cannot hold (first: {clip_words(odd[0], 200)}); "
                              f"give the checkpoint of a model of real floating-point weights, as torch.save(model.state_dict()) writes it")
    # A file of nan/inf weights (a diverged run's, or a damaged one) loads without complaint and
    # teaches garbage for hours. Parameters and BatchNorm statistics are always finite in a model
    # worth loading; other buffers (masks, indices) are left alone. isfinite takes no 8-bit floats:
    # those are checked as float32.
    stats = finite_names(model)
    bad = [k for k in own if k in stats and sd[k].is_floating_point()
           and not bool(torch.isfinite(sd[k] if sd[k].dtype.itemsize > 1 else sd[k].float()).all())]
    if bad:
        raise CheckpointError(f"{path}: {counted(len(bad), 'tensor')} {'holds' if len(bad) == 1 else 'hold'} nan or inf values (first: {bad[0]}): not a usable {what}; "
                              f"did the run that wrote it diverge? give the checkpoint of a run whose loss stayed finite")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()})


def _spec_problem(spec: Any) -> str | None:
    """Why a parsed ptd_spec cannot be built safely, or None: its sizes are checked before any
    builder sees them, so a negative or absurd number is this message, not an allocator's."""
    if not isinstance(spec, dict):
        return f"it is a JSON {type(spec).__name__}, not an object"
    for key, hi in (("num_classes", MAX_SPEC_CLASSES), ("in_channels", MAX_SPEC_IN_CHANNELS)):
        v = spec.get(key, 1)
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= hi:
            return f"{key} {v!r} is not a whole number in 1..{hi:,}"
    w = spec.get("width", 1.0)
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or not 0 < w <= MAX_SPEC_WIDTH:
        return f"width {w!r} is not a number in (0, {MAX_SPEC_WIDTH:g}]"
    stack = [spec]  # every other number in it (plan entries, channel widths): finite and of a size a layer can have
    while stack:
        node = stack.pop()
        items = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        for v in items:
            if isinstance(v, (dict, list)):
                stack.append(v)
            elif isinstance(v, float) and not math.isfinite(v):
                return f"it holds the number {v!r}"
            elif isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_SPEC_INT:
                return f"it holds the number {v:.3g}, beyond any layer size"
    return None


def _file_values(path: Path) -> int | None:
    """How many numbers the tensors of a safetensors file hold, read from its header alone."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    except (SafetensorError, OSError, ValueError):
        return None  # load_into reports the file's own problem


_BUILD_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError, AssertionError, RuntimeError,
                 MemoryError, OverflowError, RecursionError, ZeroDivisionError)


def _build_spec(path: Path, spec: dict, device: str | None = None) -> nn.Module:
    """``build_from_spec``, any failure one CheckpointError naming ``path``."""
    from ptd.models import build_from_spec

    fix = "load the weights into a model you build (ptd.train.checkpoint.load_into)"
    try:
        with warnings.catch_warnings(), (torch.device(device) if device else contextlib.nullcontext()):
            warnings.simplefilter("ignore")  # e.g. "Initializing zero-element tensors": the error says more
            return build_from_spec(spec)
    except PtdError as e:  # an unknown arch: the file names a model this ptd does not have
        # Most often a user's own model, registered in Python (ptd.models.MODELS.register) for the
        # run that wrote the file: the command rebuilds it only with that --plugin file ("another ptd
        # version or edited" sent such a user looking for damage: new-user audit).
        raise CheckpointError(f"{path}: its architecture metadata names {spec.get('arch')!r}, a model this process does not have "
                              f"({clip_words(one_line(e), 200)}); a model registered in Python (ptd.models.MODELS.register) "
                              f"rebuilds only where it is registered: pass the file that registers it (ptd eval/export "
                              f"--plugin FILE.py; the run's env.json names the one it was made with); else the file was written "
                              f"by another ptd version or edited: {fix}") from None
    except _BUILD_ERRORS as e:  # a spec from another ptd version, or edited by hand
        raise CheckpointError(f"{path}: its ptd architecture metadata does not build a model "
                              f"({type(e).__name__}: {_first_sentence(e, 160)}); {fix}") from None


def load_model(path: str | Path) -> nn.Module:
    """Rebuild a model from a ptd safetensors file (architecture from its metadata) and load it.
    A derived student's file needs ``ptd.students`` imported first (it registers how channel widths
    are replayed); train sits below students, so callers import it (cli eval, export)."""
    p = Path(path)
    meta = read_metadata(p)
    if "ptd_spec" not in meta:
        raise CheckpointError(f"{path}: carries no ptd architecture metadata; load it into a model you build (ptd.train.checkpoint.load_into)")
    fix = "load the weights into a model you build (ptd.train.checkpoint.load_into)"
    try:
        spec = json.loads(meta["ptd_spec"])
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: its ptd architecture metadata is not JSON ({_first_sentence(e, 160)}); {fix}") from None
    problem = _spec_problem(spec)
    if problem:
        raise CheckpointError(f"{path}: its ptd architecture metadata does not build a model ({problem}); {fix}")
    # Sized first on the meta device (shapes, no memory): a model larger than the weights the file
    # holds cannot be the one saved in it, and is refused before anything is allocated.
    try:
        sized = _build_spec(p, spec, "meta")
    except CheckpointError:
        sized = None  # some builders cannot run on meta tensors; the real build below reports the problem
    have = _file_values(p)
    if sized is not None and have is not None:
        need = sum(v.numel() for v in sized.state_dict().values())
        if need > have:
            raise CheckpointError(f"{path}: its ptd architecture metadata describes a model of {need:,} values, but the file "
                                  f"holds {have:,}: the metadata belongs to another model or was edited; {fix}")
    model = _build_spec(p, spec)
    load_into(model, p)
    rec = _records(p, meta)
    if rec["input_size"] is not None:
        model.ptd_input_size = rec["input_size"]
    if rec["classes"] is not None:
        model.ptd_classes = rec["classes"]
    norm = _normalize(meta.get("normalize"))
    if norm is not None:  # carried on, so a student saved or exported from this model records it too
        model.ptd_normalize = norm
    return model


def _normalize(text: str | None) -> dict[str, list[float]] | None:
    """A model file's recorded input normalisation, or None where it records none or something
    else (it is information for whoever feeds the model, not an input ptd computes with)."""
    try:
        v = json.loads(text) if text else None
    except (ValueError, RecursionError):
        return None
    ok = (isinstance(v, dict) and set(v) == {"mean", "std"} and all(isinstance(v[k], list) and v[k] and
          all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v[k]) for k in v) and len(v["mean"]) == len(v["std"]))
    return {"mean": [float(x) for x in v["mean"]], "std": [float(x) for x in v["std"]]} if ok else None


MAX_INPUT_SIDE = 65536  # pixels: larger than any image a classifier is trained on


def recorded(path: str | Path) -> dict[str, Any]:
    """What a ptd model file records of the data it was trained on, parsed: ``input_size`` (height,
    width) and ``classes`` (its outputs' class names, in order), each None where the file records
    none (a torch state dict, a ptd file from before the record). A damaged record: one line."""
    try:
        meta = read_metadata(path)
    except CheckpointError:
        meta = {}  # not safetensors: load_into reads it, and says what is wrong with it
    return _records(Path(path), meta)


def _records(path: Path, meta: dict[str, str]) -> dict[str, Any]:
    return {"input_size": _input_size(path, meta["input_size"]) if "input_size" in meta else None,
            "classes": _classes(path, meta["classes"]) if "classes" in meta else None}


def _classes(path: Path, text: str) -> list[str]:
    try:
        names = json.loads(text)
    except (ValueError, RecursionError):
        names = None
    if not (isinstance(names, list) and names and all(isinstance(c, str) for c in names)):
        raise CheckpointError(f"{path}: its recorded classes {text[:60]!r} are not a list of class names; the file was "
                              f"edited: save the model again, or remove the 'classes' metadata")
    return names


def check_fits_data(path: str | Path, size: Sequence[int] | None, recorded: Sequence[str] | None, want: Sequence[int],
                    classes: Sequence[str], where: str, data: str, role: str = "model", other: bool = False) -> None:
    """Refuse, in one line, to score or teach from a model file on data it was not trained on: at
    another image size than the ``size`` (height, width) it records, or with labels that number
    ``classes`` other than its ``recorded`` class list (None: nothing recorded, nothing checked).
    ``want``: the size the data is fed at; ``where``: what feeds it ("this run", the config's path);
    ``data``: how the data is named ("data.name=cifar10"); ``role``: "model" or "teacher";
    ``other``: also suggest giving a model trained at ``want``. ``ptd eval`` and a run's
    ``--teacher`` check share it, so the two say the same.

    Another size: the accuracy is of images the model never saw at that scale. The same class
    count in another order -- a Tiny-ImageNet wnids.txt remade with ``ls``, an ImageFolder with a
    folder renamed -- gives every image a label the model never meant, and an accuracy near chance
    that looks like a bad model."""
    if size is not None and tuple(size) != tuple(want):
        fix = (f"set data.image_size={size[0]} or " if size[0] == size[1] else "") + "use the config it was trained with"  # image_size is a square side
        alt = f", or give a {role} trained at {want[0]}x{want[1]}" if other else ""
        raise CheckpointError(f"{path}: the {role} was trained on {size[0]}x{size[1]} images, but {where} feeds it "
                              f"{want[0]}x{want[1]}; {fix}{alt}")
    if recorded is None or list(recorded) == list(classes):
        return
    if len(recorded) != len(classes):
        raise CheckpointError(f"{path}: the {role} has {len(recorded)} classes and {data} has {len(classes)}; use the data it "
                              f"was trained on")
    i = next(k for k, (a, b) in enumerate(zip(recorded, classes)) if a != b)
    known = set(classes)
    how = ("the same classes in another order" if sorted(recorded) == sorted(classes) else
           f"{sum(a not in known for a in recorded)} of its {len(recorded)} classes are not among the data's")
    raise CheckpointError(f"{path}: the {role}'s class {i} is {recorded[i]!r} but {data} numbers {classes[i]!r} there ({how}); "
                          f"use the data it was trained on, with its class list (e.g. the dataset's own wnids.txt) unchanged")


def _input_size(path: Path, text: str) -> tuple[int, int]:
    """The (height, width) a model file records it was trained at; one line if the record is damaged."""
    try:
        size = json.loads(text)
    except (ValueError, RecursionError):
        size = None
    if not (isinstance(size, list) and len(size) == 2 and all(type(v) is int and 0 < v <= MAX_INPUT_SIDE for v in size)):
        raise CheckpointError(f"{path}: its recorded input size {text[:60]!r} is not [height, width] in pixels; the file "
                              f"was edited: save the model again, or remove the 'input_size' metadata")
    return size[0], size[1]


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
    ``scheduler``, ``rng`` (``rng_state()``), ``hooks``, ``metrics`` (every row so
    far), ``best`` ({epoch, acc}), ``steps``, ``wall_s``, ``world_size`` (the DDP processes that
    trained it: :func:`check_world_size`). Tensors are copied to the CPU first so
    the file loads on any device.
    """
    if not isinstance(state, dict):
        raise TypeError("save_resume: state must be a dict")
    state = {**_to_cpu(state), "format": RESUME_FORMAT}
    buf = io.BytesIO()  # in memory first, so a full disk is an OSError from the write (see save_tensors)
    torch.save(state, buf)
    write_bytes(Path(out_dir) / RESUME_FILE, buf.getbuffer())  # a view: no second copy of the state


def load_resume(out_dir: str | Path, world_size: int | None = None) -> dict[str, Any] | None:
    """The last committed epoch's state from ``out_dir/resume.pt``, or None when there is none.

    Read with ``weights_only=True``: no code from the file runs. A file that is not a ptd resume
    commit (it cannot be torn: commits are atomic) is a one-line CheckpointError with the fix.
    With ``world_size``, so is a commit of a stage started with another number of DDP processes
    (:func:`check_world_size`).
    """
    state = _read_resume(Path(out_dir) / RESUME_FILE)
    if state is not None and world_size is not None:
        check_world_size(state, out_dir, world_size)
    return state


def check_resume(out_dir: str | Path, world_size: int | None = None) -> None:
    """Refuse, as :func:`load_resume` would when the stage starts, an ``out_dir/resume.pt`` that is
    not a ptd resume commit, or one of another world size (default: this process's, from
    torchrun's WORLD_SIZE, as ``init_distributed`` reads it): checked when a run directory is
    opened, before anything is written. Memory-mapped, so the tensors are not read."""
    state = _read_resume(Path(out_dir) / RESUME_FILE, mmap=True)
    if state is not None:
        check_world_size(state, out_dir, int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size)


def check_world_size(state: dict[str, Any], out_dir: str | Path, world_size: int) -> None:
    """A one-line CheckpointError when ``state`` (a resume commit) was written by a run of another
    number of DDP processes than ``world_size``.

    Every rank trains on 1/world of the split at ``batch_size`` images a step, so a stage resumed
    at another world size would mix two sharding schemes and global batches in one schedule (seen:
    3 steps an epoch, then 7), which nothing but env.json would show.

    A commit without the field was written by a ptd before it recorded one. It is accepted, as
    that ptd did: its world size is unknown, not 1 (taking it as 1 would refuse every interrupted
    torchrun stage and advise resuming it on one process, the very mix this check is for), and
    such files do not outlive the stage that wrote them (``remove_resume`` at its ``done``).
    """
    was = state.get("world_size")
    if was is None or int(was) == world_size:
        return
    was = int(was)
    how = f"with {was} processes (e.g. torchrun --nproc_per_node={was})" if was > 1 else "as one process (without torchrun)"
    raise CheckpointError(f"{out_dir} was started with {counted(was, 'process', 'processes')} and is resumed with {world_size}; "
                          f"re-run it {how}, or pass --out a new directory")


def _read_resume(p: Path, mmap: bool = False) -> dict[str, Any] | None:
    if not p.is_file():
        return None
    fix = f"delete {p} to restart this stage from its first epoch"
    if not zipfile.is_zipfile(p):  # (mmap takes only the zip form, and says so in torch's words)
        raise CheckpointError(f"{p}: not a ptd resume file (not the zip archive torch.save writes); {fix}")
    try:
        state = torch.load(str(p), map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:  # weights_only refused an object: ptd writes only tensors and plain values
        raise CheckpointError(f"{p}: not a ptd resume file (it holds Python objects other than tensors and plain values, "
                              f"which ptd never writes and does not load); {fix}") from None
    except Exception as e:  # unpickling fails in many types; all mean "not a resume file"
        raise CheckpointError(f"{p}: not a readable ptd resume file ({type(e).__name__}: "
                              f"{one_line(str(e).split('. ')[0])[:160] if str(e) else 'unreadable'}); {fix}") from None
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
