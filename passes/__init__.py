"""Graph passes (installed as ``sparsecomp.passes``): find attention sites, prove masks, rewrite."""

from .mask import MaskInterpreter, MaskStructure, canonicalize_mask
from .match import SITE_RULES, find_sites, fold_kv_repeat
from .rewrite import KernelOptions, rewrite_site
from .site import AttentionSite

__all__ = [
    "SITE_RULES",
    "AttentionSite",
    "KernelOptions",
    "MaskInterpreter",
    "MaskStructure",
    "canonicalize_mask",
    "find_sites",
    "fold_kv_repeat",
    "rewrite_site",
]
