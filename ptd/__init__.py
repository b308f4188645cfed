"""ptd: prune, then distill (Park & No, "Prune Your Model Before Distill It", ECCV 2022)."""
__version__ = "0.1.0"
