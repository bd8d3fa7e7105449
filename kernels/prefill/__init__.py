"""Prefill kernels: block-sparse FlashAttention over the sparse index, the index builders (static
and adaptive) and the Triton helpers they use (installed as ``sparsecomp.kernels.prefill``)."""
