"""sparsecomp: a training-free sparse-attention compiler for PyTorch."""

import torch

from . import kernels, passes  # noqa: F401  (registers torch.ops.sparsecomp.*)
from .api import compile, inspect
from .backend import counters, sparsecomp_backend
from .passes.rewrite import KernelOptions
from .plan import Plan, Rule, model_fingerprint

__version__ = "0.1.0"
__all__ = [
    "KernelOptions",
    "Plan",
    "Rule",
    "compile",
    "counters",
    "inspect",
    "model_fingerprint",
    "sparsecomp_backend",
]

try:  # torch.compile(model, backend="sparsecomp") works after `import sparsecomp`
    torch._dynamo.register_backend(name="sparsecomp")(sparsecomp_backend)
except Exception:  # already registered through the entry point
    pass
