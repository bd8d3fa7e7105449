"""Attention kernels and the ops that call them (installed as ``sparsecomp.kernels``).

Each op is a ``torch.library.custom_op``: opaque to every torch.compile, ours or a user's (a traced
launcher would bake the strides seen at trace time; torch 2.11's Inductor keeps only their order,
and a batch of 2 then read out of bounds), and carries a plain PyTorch reference of the same
semantics that runs on CPU. Callers go through ``sparse_attention_call`` (a ``SparseIndex`` and
``KernelOptions``), not the raw op's 25 arguments.
"""

# This folder is installed as sparsecomp.kernels. Run from the repository root, Python can also find it
# as a bare top-level "kernels", the name of Hugging Face's kernels package (which transformers 5.25
# requires and imports). Under that name it must not be ours: executing the modules twice would
# register the ops twice, and transformers would miss the names it imports. So the installed package
# of that name, found past the repository root, takes its place.
if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import sys
    from pathlib import Path

    _root = Path(__file__).resolve().parent.parent
    _elsewhere = [p for p in sys.path if Path(p or ".").resolve() != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is not None:  # the import statement returns what sys.modules holds once this has run
        _installed = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _installed
        _spec.loader.exec_module(_installed)
elif __name__ == "sparsecomp.kernels":
    from .common import KernelOptions, check_kernel_options
    from .prefill.block_index import SparseIndex, block_index_bound, build_block_index, index_positions
    from .prefill.block_sparse_attention import (
        SUPPORTED_DTYPES,
        check_head_dim,
        sparse_attention,
        sparse_attention_call,
        sparse_attention_reference,
    )

__all__ = [
    "SUPPORTED_DTYPES",
    "KernelOptions",
    "SparseIndex",
    "block_index_bound",
    "build_block_index",
    "check_head_dim",
    "check_kernel_options",
    "index_positions",
    "sparse_attention",
    "sparse_attention_call",
    "sparse_attention_reference",
]
