"""One file per pruning strategy; importing this package registers them all."""
from ptd.pruning.strategies import imp  # noqa: F401
