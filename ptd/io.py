"""Reading the files of a run directory, so that a damaged one is one line, not a traceback.

ptd writes every file of a run whole (a temporary renamed into place), so a file that does not
parse was changed by something else: a disk, a sync tool, an editor. Each reader here raises
``DamagedFileError`` naming the file, what is wrong and what to do, which the CLI prints as its
one line (exit 2). Imports nothing from ptd but the error base: every layer may use it.
"""
from __future__ import annotations

import json
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


def read_yaml_mapping(path: str | Path, fix: str | None = None) -> dict[str, Any]:
    """The mapping in a YAML file ptd wrote (a run's config.yaml); ``DamagedFileError`` otherwise."""
    import yaml

    try:
        obj = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise damaged(path, "missing", fix) from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise damaged(path, f"not YAML: {type(e).__name__}: {one_line(e)}", fix) from None
    if not isinstance(obj, dict):
        raise damaged(path, f"holds {type(obj).__name__}, not a mapping of config sections", fix)
    return obj
