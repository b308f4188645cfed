"""Training: the loop, its hooks, optimizers, checkpoints and DDP plumbing."""
from ptd.train.loop import Runtime, Supervised, evaluate, fit, train_step

__all__ = ["Runtime", "Supervised", "evaluate", "fit", "train_step"]
