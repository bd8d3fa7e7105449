"""The patterns sparsecomp knows, one module each, in a registry everything else iterates (see base)."""

# isort: off
# Registration order is the order plans list kinds in and calibration tries candidates in.
from . import dense, streaming, elastic, vertical_slash, sample, block_topk, double_sparsity, quest, snapkv, h2o  # noqa: F401

# isort: on
from .base import COUNT, FRACTION, PATTERNS, POSITIVE, SHARE, Pattern, Range, pattern, register, unregister

__all__ = [
    "COUNT", "FRACTION", "PATTERNS", "POSITIVE", "SHARE", "Pattern", "Range", "pattern", "register", "unregister",
]  # fmt: skip
