"""Training: the loop, its hooks, optimizers, checkpoints, DDP plumbing and the CPU conv weight-gradient path (fastconv)."""
from ptd.train.loop import Runtime, Supervised, evaluate, fit, train_step

__all__ = ["Runtime", "Supervised", "evaluate", "fit", "train_step"]
