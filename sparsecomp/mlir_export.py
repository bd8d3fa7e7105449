"""A rewritten graph lowered to MLIR's torch dialect (torch-mlir's FX importer), the sparse ops
visible as custom ops (``torch.operator "torch.sparsecomp.sparse_attention"``). torch-mlir is an
optional extra (``pip install 'sparsecomp[mlir]'``)."""

from __future__ import annotations

import torch
import torch.fx as fx


def _example(node: fx.Node, generator: torch.Generator):
    """A real input like the one the graph was traced with (random floats, zero integers)."""
    value = node.meta.get("example_value", node.meta.get("val"))
    if not isinstance(value, torch.Tensor):
        return value
    if value.dtype.is_floating_point:
        return torch.randn(value.shape, dtype=value.dtype, generator=generator).to(value.device)
    return torch.zeros(value.shape, dtype=value.dtype, device=value.device)


def to_mlir(gm: fx.GraphModule, func_name: str = "rewritten"):
    """The torch-dialect MLIR module of ``gm`` (``str()`` it for the text). The module is imported
    as traced ("raw"): torch-mlir's lowering to its backend contract has no shapes for our ops."""
    try:
        from torch_mlir import fx as torch_mlir_fx
    except ImportError as e:
        raise ImportError("to_mlir needs torch-mlir: pip install 'sparsecomp[mlir]'") from e
    g = torch.Generator().manual_seed(0)
    inputs = [_example(n, g) for n in gm.graph.nodes if n.op == "placeholder"]
    # Traced into, a Triton-backed op would show as its kernel launch; kept whole, as the op it is.
    with torch._functorch.config.patch(decompose_custom_triton_ops=False), torch.no_grad():
        return torch_mlir_fx.export_and_import(gm, *inputs, output_type="raw", func_name=func_name)
