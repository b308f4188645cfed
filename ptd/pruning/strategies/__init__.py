"""One file per pruning strategy; importing this package registers them all."""
from ptd.pruning.strategies import gmp, imp, oneshot, random_control, snip, synflow  # noqa: F401
