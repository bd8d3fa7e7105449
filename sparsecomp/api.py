"""Public entry points: compile() and inspect()."""

from __future__ import annotations

import torch

from .backend import BackendOptions, SparsecompBackend, last_backend
from .plan import Plan, model_fingerprint
from .report import InspectReport


def compile(
    model: torch.nn.Module,
    plan=None,
    *,
    kernel_options=None,
    inner: str = "inductor",
    cost_model="auto",
    tuning_cache=None,
    **torch_compile_kwargs,
):
    """``torch.compile`` with every attention rewritten by ``plan`` (a Plan, preset or .json path).

    Per site, the cost model (``cost_model="auto"``: fitted on this GPU by ``sparsecomp.autotune``,
    else the shipped H100 fit) keeps the dense attention where it is predicted faster and picks the
    kernel config; stored autotune times (``tuning_cache``, default: this GPU's cache) replace its
    predictions. ``cost_model=False`` follows the plan everywhere. ``kernel_options`` forces one
    config (block sizes, warps...); ``inner`` picks what compiles the rewritten graph
    (``"inductor"``; ``"aot_eager"`` or ``"eager"`` for debugging). Other keyword arguments go to
    ``torch.compile`` (``dynamic``, ``fullgraph``, ``mode``...).
    """
    plan = Plan.from_any(plan)
    plan.check_fingerprint(model_fingerprint(model))
    backend = SparsecompBackend(
        BackendOptions.from_any(
            {
                "plan": plan,
                "kernel_options": kernel_options,
                "inner": inner,
                "cost_model": cost_model,
                "tuning_cache": tuning_cache,
            }
        )
    )
    compiled = torch.compile(model, backend=backend, **torch_compile_kwargs)
    # On the wrapper itself: torch's OptimizedModule forwards attribute writes to the wrapped model,
    # so two compiles of one model would share (and overwrite) one report.
    object.__setattr__(compiled, "_sparsecomp_backend", backend)
    return compiled


def inspect(compiled=None) -> InspectReport:
    """The report of a model from ``sparsecomp.compile`` (or, with no argument or a model from
    ``torch.compile(..., backend="sparsecomp")``, of the last graph that backend compiled)."""
    backend = getattr(compiled, "_sparsecomp_backend", None) or last_backend()
    if backend is None:
        return InspectReport([])
    return backend.report()
