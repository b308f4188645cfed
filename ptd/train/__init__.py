"""Training: the loop, its hooks, optimizers, checkpoints and DDP plumbing."""
from ptd.train.loop import Runtime, cross_entropy_loss, evaluate, fit

__all__ = ["Runtime", "cross_entropy_loss", "evaluate", "fit"]
