"""Graph passes (installed as ``sparsecomp.passes``): find attention sites, prove masks, rewrite."""

# This folder is installed as sparsecomp.passes. Run from the repository root, Python can also find it
# as a bare top-level "passes" (transformers probes for a package of that name). Importing it under
# that name must do nothing: executing the modules twice would register the ops twice.
if __name__ == "sparsecomp.passes":
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
