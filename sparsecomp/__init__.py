"""sparsecomp: a training-free sparse-attention compiler for PyTorch."""

import os

import torch

# In a source checkout, passes/ and kernels/ sit beside this folder (pyproject maps them into the
# package when it is installed): let Python find them as sparsecomp.passes / sparsecomp.kernels too,
# so that running from the repository root imports one sparsecomp, whichever way it was installed.
_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not os.path.isdir(os.path.join(__path__[0], "kernels")) and os.path.isfile(
    os.path.join(_root, "kernels", "__init__.py")
):
    __path__.append(_root)

from . import kernels, passes  # noqa: F401  (registers torch.ops.sparsecomp.*)
from .api import compile, inspect
from .calibration.calibrate import calibrate
from .calibration.channels import calibrate_channels
from .calibration.eviction_budgets import calibrate_snapkv_budgets
from .calibration.streaming_heads import calibrate_streaming_heads
from .compiler.backend import counters, sparsecomp_backend
from .passes.rewrite import KernelOptions
from .plan import Plan, Rule, model_fingerprint
from .tuning.autotune import autotune
from .tuning.cost_model import KERNEL_CONFIGS, CostModel

__version__ = "0.1.0"
__all__ = [
    "KERNEL_CONFIGS",
    "CostModel",
    "EvictingKVCache",
    "HostKVCache",
    "KernelOptions",
    "Plan",
    "PlanKVCache",
    "Rule",
    "StreamingKVCache",
    "autotune",
    "calibrate",
    "calibrate_channels",
    "calibrate_snapkv_budgets",
    "calibrate_streaming_heads",
    "compile",
    "counters",
    "inspect",
    "model_fingerprint",
    "sparsecomp_backend",
]


def __getattr__(name):
    if name == "HostKVCache":  # needs transformers (an optional extra): imported on first use
        from .runtime.host_cache import HostKVCache

        return HostKVCache
    if name == "EvictingKVCache":
        from .runtime.evicting_cache import EvictingKVCache

        return EvictingKVCache
    if name == "PlanKVCache":
        from .runtime.plan_cache import PlanKVCache

        return PlanKVCache
    if name == "StreamingKVCache":
        from .runtime.streaming_cache import StreamingKVCache

        return StreamingKVCache
    raise AttributeError(f"module 'sparsecomp' has no attribute {name!r}")


try:  # torch.compile(model, backend="sparsecomp") works after `import sparsecomp`
    torch._dynamo.register_backend(name="sparsecomp")(sparsecomp_backend)
except Exception:  # already registered through the entry point
    pass
