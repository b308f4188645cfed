"""ptd: prune, then distill (Park & No, "Prune Your Model Before Distill It", ECCV 2022)."""
__version__ = "0.1.0"

import os as _os

# This process's parent when ptd was first imported, milliseconds after it started: a torchrun
# worker's launcher. ptd.train.distributed.watch_parent compares with it; read later (after
# torch's import, seconds), a launcher killed in between had already handed the worker to init,
# and the worker waited on forever.
LAUNCH_PARENT = _os.getppid()
