"""The one base class for every error a user can cause (a bad config, path, file or device).

The CLI catches ``PtdError`` in one place, prints ``ptd: error: <message>`` and exits 2. Anything
that is not a ``PtdError`` is a bug in ptd: the CLI prints it as one ``ptd: internal error`` line
(exit 1) and keeps the traceback in a file; OS errors and out-of-memory are the user's environment
(exit 2). Messages are one line: what is
wrong, where (key or path), and the fix.

Subclasses keep the builtin base they always had (``ConfigError(PtdError, ValueError)``,
``UnknownNameError(PtdError, KeyError)``) so code that catches ``ValueError``/``KeyError`` still
works. This module imports nothing from ptd: every layer may import it.
"""
from __future__ import annotations

import math
from typing import Callable


# The longest line an error prints. Real messages stay under about 600 characters (a path, the
# problem, the fix); a longer one quotes user data (a config value expanded from YAML aliases made
# a 5.8 MB line). Its head and its tail (where the fix is) are kept.
MAX_LINE = 1000
_HEAD, _TAIL = 700, 250


def one_line(text: object) -> str:
    """``text`` with line breaks folded into spaces: the CLI prints exactly one line, of at most
    about ``MAX_LINE`` characters (a longer one keeps its start and its end, and says how much was cut)."""
    line = " ".join(str(text).splitlines()).strip()
    if len(line) <= MAX_LINE:
        return line
    return f"{line[:_HEAD]} ... [{len(line) - _HEAD - _TAIL:,} of {len(line):,} characters cut] ... {line[-_TAIL:]}"


class PtdError(Exception):
    """Base of everything a user can cause. ``str(e)`` is always a single line.

    ``every_rank``: raised by every DDP rank alike (the checks before any work), so the CLI prints
    it once, on rank 0; any other is printed by the rank that raised it (a damaged image in one
    rank's shard), named by its rank. Set by :func:`on_every_rank`, except on an error its raiser
    marked ``rank_own`` (one rank's share of a check the ranks split between them)."""

    every_rank = False
    rank_own = False

    def __str__(self) -> str:
        return one_line(super().__str__())


class on_every_rank:
    """``with on_every_rank(): ...``: a PtdError raised inside is one every rank raises (config,
    preflight and run-directory checks, which every rank runs on the same inputs)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, e, tb) -> bool:
        if isinstance(e, PtdError) and not e.rank_own:
            e.every_rank = True
        return False


class PreflightError(PtdError, ValueError):
    """Something checkable before work starts is wrong (model kwargs, device, output folder...)."""


class DivergedError(PtdError, FloatingPointError):
    """Training produced a nan or infinite loss: the run stops before that epoch is committed."""


class DamagedFileError(PtdError, ValueError):
    """A file of a run directory that does not parse (ptd writes them whole: something else changed it)."""


class StaleStageError(PtdError, ValueError):
    """A finished stage was made from a file that has changed since (the stage before it was
    redone, or the file replaced): reusing it would mix two runs' results."""


class LayerCollapseError(PtdError, ValueError):
    """Pruning removed every weight of a layer: the network no longer connects its input to its
    output and predicts one class whatever the image (layer collapse, Tanaka et al. 2020)."""


class WorkerDiedError(PtdError, RuntimeError):
    """A worker process of ``jobs: N`` was killed mid-task (typically by the kernel's out-of-memory
    killer): the environment, not ptd, so one line with the fix."""


def least_shown(x: float, ok: Callable[[float], bool] = lambda v: True) -> str:
    """The smallest number of two significant digits, at least ``x`` (> 0), that ``ok`` accepts, as
    the text a refusal's fix names: rounded to nearest it could fall under ``x``, and the figure a
    fix names must itself pass (``prune.rate``, ``data.val_fraction``)."""
    step = 10.0 ** (math.floor(math.log10(x)) - 1)
    k = math.ceil(x / step)
    while not ok(float(text := f"{k * step:.2g}")):
        k += 1
    return text


def counted(n: float | str | None, one: str, many: str | None = None) -> str:
    """'1 student', '3 students', '0 seeds': a count with its noun in the number the count takes
    (``many``: the plural where it is not ``one`` + "s", e.g. "strategies"). ``n`` may be the count
    as the text shows it ("1,234" epochs, "1/2" threads); only exactly 1 is singular. Messages and
    reports said "student(s)" and "seed(s)" whatever the count."""
    shown = f"{n:,}" if isinstance(n, int) else f"{n:,g}" if isinstance(n, float) else str(n)
    return f"{shown} {one if shown.strip() in ('1', '1.0') else many or one + 's'}"
