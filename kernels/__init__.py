"""Attention kernels and the ops that call them (installed as ``sparsecomp.kernels``).

Each op is a ``torch.library.custom_op``: opaque to every torch.compile, ours or a user's (a traced
launcher would bake the strides seen at trace time; torch 2.11's Inductor keeps only their order,
and a batch of 2 then read out of bounds), and carries a plain PyTorch reference of the same
semantics that runs on CPU. Callers go through ``sparse_attention_call`` (a ``SparseIndex`` and
``KernelOptions``), not the raw op's 25 arguments.
"""

# This folder is installed as sparsecomp.kernels. Run from the repository root, Python can also find it
# as a bare top-level "kernels" (transformers probes for a package of that name). Importing it under
# that name must do nothing: executing the modules twice would register the ops twice.
if __name__ == "sparsecomp.kernels":
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
