"""TensorBoard scalars for a training stage: a loop hook that logs every number of each epoch's
metrics row (loss terms, accuracies, learning rate, sparsity, ...) under one log directory.

    hook = tensorboard_hook(run_dir / "tb" / "teacher")   # None when tensorboard is not installed
    fit(..., hooks=[*hooks, hook] if hook else hooks)

View with ``tensorboard --logdir RUN_DIR``. The step is the 1-based epoch of the row, as in
metrics.jsonl. Tags: ``train_<x>`` -> ``train/<x>``, ``val_<x>`` -> ``val/<x>``, anything else
(lr, sparsity, a loss term) under its own name; nested dicts become ``a/b``.

Resume: the writer opens lazily at the first epoch this session finishes, with ``purge_step`` set
to that epoch, so events a killed session logged for epochs that were never committed (and are
now being trained again) are dropped by TensorBoard instead of showing twice.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

# Bookkeeping columns of a metrics row that are not curves.
SKIP = {"epoch", "best"}


def available() -> bool:
    """True when the tensorboard package (what SummaryWriter writes through) is installed."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def scalars(row: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """(tag, value) for every number in ``row``; bools, None and text are skipped."""
    for k, v in row.items():
        if not prefix and k in SKIP:
            continue
        if isinstance(v, dict):
            yield from scalars(v, f"{prefix}{k}/")
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        tag = k
        if not prefix:
            for split in ("train", "val", "test"):
                if k.startswith(split + "_"):
                    tag = f"{split}/{k[len(split) + 1:]}"
                    break
        yield prefix + tag, float(v)


class TensorBoardHook:
    """Loop hook: ``end_epoch(epoch, row)`` writes the row's scalars at step ``row["epoch"]``
    (``epoch + 1`` when the row has none). ``epochs``: the stage's length; the writer closes after
    that epoch. Call ``close()`` when a stage ends early."""

    def __init__(self, log_dir: str | Path, epochs: int | None = None):
        self.log_dir = Path(log_dir)
        self.epochs = epochs
        self.writer = None

    def end_epoch(self, epoch: int, row: dict[str, Any]) -> None:
        step = int(row.get("epoch", epoch + 1))
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=step)
        for tag, value in scalars(row):
            self.writer.add_scalar(tag, value, global_step=step)
        # Flushed every epoch: a killed run keeps what it logged up to its last committed epoch.
        self.writer.flush()
        if self.epochs is not None and step >= self.epochs:
            self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def tensorboard_hook(log_dir: str | Path, epochs: int | None = None, enabled: bool = True) -> TensorBoardHook | None:
    """A ``TensorBoardHook`` writing under ``log_dir``, or None when tensorboard is not installed
    or ``enabled`` is False (pass ``enabled=ctx.main`` so only rank 0 writes)."""
    if not enabled or not available():
        return None
    return TensorBoardHook(log_dir, epochs)
