"""Reading the files of a run directory, so that a damaged one is one line, not a traceback.

ptd writes every file of a run whole (a temporary renamed into place), so a file that does not
parse was changed by something else: a disk, a sync tool, an editor. Each reader here raises
``DamagedFileError`` naming the file, what is wrong and what to do, which the CLI prints as its
one line (exit 2). Imports nothing from ptd but the error base: every layer may use it.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any

from ptd.errors import DamagedFileError, one_line


def default_fix(path: Path) -> str:
    """Where a stage's file is damaged, its stage can be redone; elsewhere, a new run."""
    return f"restore it, or delete {path.parent} and the stages after it to redo them, or run into a new --out"


def damaged(path: str | Path, why: str, fix: str | None = None) -> DamagedFileError:
    p = Path(path)
    return DamagedFileError(f"{p}: damaged ({why[:160]}); ptd writes its files whole, so something else changed it; "
                            f"{fix or default_fix(p)}")


def read_json(path: str | Path, fix: str | None = None) -> Any:
    """The JSON value in ``path``; ``DamagedFileError`` when it is missing, unreadable or not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise damaged(path, "missing", fix) from None
    except (OSError, UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise damaged(path, f"not JSON: {type(e).__name__}: {one_line(e)}", fix) from None


def read_json_object(path: str | Path, fix: str | None = None) -> dict[str, Any]:
    """:func:`read_json` for files that hold one JSON object (every ptd result and stats file)."""
    obj = read_json(path, fix)
    if not isinstance(obj, dict):
        raise damaged(path, f"holds a JSON {type(obj).__name__}, not an object", fix)
    return obj


# The first line of a run's config.yaml: a YAML comment, so every YAML reader skips it, carrying
# the digest of the rest. A config cut short (a full disk, a copy interrupted) mostly still
# parses, as a mapping missing its last keys, and was then refused as "a different config".
SEAL = "# ptd run config; sha256 of the lines below: "


def seal(text: str) -> str:
    """``text`` under a first line giving its sha256 (:func:`read_yaml_mapping` checks it)."""
    return f"{SEAL}{hashlib.sha256(text.encode()).hexdigest()}\n{text}"


def check_seal(path: str | Path, text: str, fix: str | None = None) -> None:
    """A text that starts with ptd's seal line matches the digest in it; ``DamagedFileError``
    otherwise. A text without one (a config written by hand, or by ptd before the seal) passes."""
    if not text.startswith(SEAL[:16]):
        return
    first, _, rest = text.partition("\n")
    digest = first[len(SEAL):] if first.startswith(SEAL) else ""
    if len(digest) != 64 or hashlib.sha256(rest.encode()).hexdigest() != digest:
        raise damaged(path, "its text is not what ptd wrote: the sha256 in its first line does not match the rest "
                      "(cut short, or edited)", (fix or default_fix(Path(path))) + "; to keep an edit, delete the first line")


MAX_YAML_BYTES = 2**20  # a config file, the user's (ptd.config.MAX_CONFIG_BYTES) or a run's config.yaml: a few KB


def read_yaml_mapping(path: str | Path, fix: str | None = None) -> dict[str, Any]:
    """The mapping in a YAML file ptd wrote (a run's config.yaml); ``DamagedFileError`` otherwise."""
    import yaml

    try:
        with open(path, "rb") as f:
            # A run's config.yaml is a few KB: read no more than a config can be (ptd.config's
            # MAX_CONFIG_BYTES), or a 600 MB file there hung the resume (bad-input audit's class).
            data = f.read(MAX_YAML_BYTES + 1)
        if len(data) > MAX_YAML_BYTES:
            raise damaged(path, f"over {MAX_YAML_BYTES:,} bytes, more than a config ptd writes", fix)
        text = data.decode("utf-8")
        check_seal(path, text, fix)
        obj = yaml.safe_load(text)
    except FileNotFoundError:
        raise damaged(path, "missing", fix) from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise damaged(path, f"not YAML: {type(e).__name__}: {one_line(e)}", fix) from None
    if not isinstance(obj, dict):
        raise damaged(path, f"holds {type(obj).__name__}, not a mapping of config sections", fix)
    return obj


_DIGESTS: dict[tuple[str, int, int], str] = {}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on its JSON header, bytes


def safetensors_header(f, size: int) -> dict | None:
    """The JSON header of an open safetensors file (positioned at 0), or None where the file does
    not start like one; leaves ``f`` just past the header."""
    n = int.from_bytes(f.read(8), "little")
    if not 2 <= n <= min(size - 8, _MAX_HEADER):
        return None
    try:
        header = json.loads(f.read(n))
    except (UnicodeDecodeError, ValueError):
        return None
    return header if isinstance(header, dict) else None


def parses(path: str | Path) -> bool:
    """Whether a file ptd wrote still reads as its format: a safetensors header whose tensors end
    where the file does, or JSON. (Other files: True.) A changed file that fails this is damaged,
    which the readers report with their own, more precise, line."""
    p = Path(path)
    try:
        if p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".safetensors":
            size = p.stat().st_size
            with open(p, "rb") as f:
                header = safetensors_header(f, size)
                data_start = f.tell()
            if header is None:
                return False
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
            return max(ends, default=0) == size - data_start
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return False
    return True


def file_digest(path: str | Path) -> str:
    """sha256 of the file's content, hex. Remembered per (path, size, mtime) within the process: a
    resumed run asks for the same teacher's digest once per stage that used it (~0.1 s per 100 MB).

    A safetensors file is hashed by its header with sorted keys, then its data: the writer orders
    the metadata through a hash map seeded per call, so the same tensors and metadata saved twice
    differ in bytes (measured: a teacher retrained bit for bit gave another file), not in content.
    ptd's own writer now makes the header canonical (``ptd.train.checkpoint.canonical_safetensors``);
    hashing it sorted still serves files written before that, and files other writers made."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            header = safetensors_header(f, st.st_size)
            if header is not None:
                h.update(b"safetensors\0" + json.dumps(header, sort_keys=True).encode())
            else:
                f.seek(0)
            while chunk := f.read(1 << 20):
                h.update(chunk)
        _DIGESTS[key] = "sha256:" + h.hexdigest()
    return _DIGESTS[key]


def _pid_space() -> str:
    """This process's PID namespace (its /proc inode number), "0" where unknown: two containers can
    share a host name and a cache folder, each with its own PIDs."""
    try:
        return "".join(c for c in os.readlink("/proc/self/ns/pid") if c.isdigit()) or "0"
    except OSError:
        return "0"


def _host() -> str:
    return socket.gethostname().replace(".", "_").replace("-", "_")  # no '.' or '-': the tag's separators


def writer_tag() -> str:
    """``<host>-<pid namespace>-<pid>``: names a temporary file by the process writing it, so a later
    process can tell one whose writer died (``dead_writer``) from one being written now, on a
    folder several machines, or containers with one host name (review), share."""
    return f"{_host()}-{_pid_space()}-{os.getpid()}"


def dead_writer(tag: str) -> bool:
    """Whether the ``writer_tag`` ``tag`` names a process of this machine and PID namespace that is
    gone (its temporary is garbage). Another machine's or namespace's, or a tag that is not one:
    False, left alone. A bare pid (the tag of ptd before the host was in it) is taken as ours."""
    parts = tag.split("-")
    if len(parts) == 3:
        if parts[:2] != [_host(), _pid_space()]:
            return False
        pid = parts[2]
    elif len(parts) == 1:
        pid = parts[0]
    else:
        return False
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):  # alive, another user's; or a number no pid can be
        return False
    return False
