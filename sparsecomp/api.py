"""Public entry points: compile() and inspect()."""

from __future__ import annotations

import contextlib
import functools

import torch

from .compiler.backend import BackendOptions, SparsecompBackend, last_backend
from .passes.site import module_names_by_id
from .plan import model_fingerprint
from .report import InspectReport
from .runtime.step_graphs import DecodeStepGraphs


def tensor_parallel_shard(model: torch.nn.Module) -> tuple[int, int]:
    """(rank, size) of the tensor-parallel split of a model whose weights are sharded DTensors
    (transformers' ``tp_plan``, or torch's ``parallelize_module``); (0, 1) for a whole model."""
    from torch.distributed.tensor import DTensor

    for p in model.parameters():
        if isinstance(p, DTensor) and any(placement.is_shard() for placement in p.placements):
            mesh = p.device_mesh
            names = mesh.mesh_dim_names or ()
            dim = names.index("tp") if "tp" in names else 0
            return mesh.get_local_rank(dim), mesh.size(dim)
    return 0, 1


def compile(
    model,
    plan=None,
    *,
    kernel_options=None,
    inner: str = "inductor",
    cost_model="auto",
    tuning_cache=None,
    strict: bool = True,
    context_parallel: bool = False,
    cuda_graphs: bool = False,
    **torch_compile_kwargs,
):
    """``torch.compile`` with every attention rewritten by ``plan`` (a Plan, preset or .json path).

    ``model`` is a module (the result's ``generate`` runs the compiled forward too) or a function
    such as ``model.forward``. Per site, the cost model (``cost_model="auto"``: fitted on this GPU
    by ``sparsecomp.autotune``, else the shipped fit for this GPU) keeps the dense attention where
    it is predicted faster and picks the kernel config; stored autotune times (``tuning_cache``,
    default: this GPU's cache) replace its predictions. ``cost_model=False`` follows the plan
    everywhere. ``kernel_options`` forces one config (block sizes, warps...); ``inner`` picks what
    compiles the rewritten graph (``"inductor"``; ``"aot_eager"`` or ``"eager"`` for debugging).
    A plan naming a site the traced graph does not have is an error (``strict=False``: a warning
    in the report). ``cuda_graphs=True``: one-token decode steps of a static cache replay CUDA
    graphs of the whole compiled step (``runtime/step_graphs.py``). ``mode`` is Inductor's
    (``"reduce-overhead"``: its own CUDA graphs, which crash while capturing on torch 2.11).
    ``context_parallel=True``: every rank of the default process group runs the model on its chunk
    of one sequence (``input_ids`` rows, global ``position_ids``), each prefill site attending over
    the whole sequence (``docs/parallel.md``). Other keyword arguments go to ``torch.compile``
    (``dynamic``, ``fullgraph``...).
    """
    root = model if isinstance(model, torch.nn.Module) else getattr(model, "__self__", None)
    root = root if isinstance(root, torch.nn.Module) else None
    options = BackendOptions.from_any(
        {
            "plan": plan,
            "kernel_options": kernel_options,
            "inner": inner,
            "cost_model": cost_model,
            "tuning_cache": tuning_cache,
            "strict": strict,
            "context_parallel": context_parallel,
            # Inductor's mode (CUDA graphs...) is applied inside the backend: torch.compile takes a
            # mode only for its own Inductor backend
            "mode": torch_compile_kwargs.pop("mode", None),
        }
    )
    if root is not None:
        options.plan.check_fingerprint(model_fingerprint(root))
        options.plan = options.plan.for_shard(*tensor_parallel_shard(root))
    backend = SparsecompBackend(options, names_by_id=module_names_by_id(root) if root is not None else None)
    compiled = torch.compile(model, backend=backend, **torch_compile_kwargs)
    if cuda_graphs and not isinstance(compiled, torch.nn.Module):
        compiled = _graphed(compiled, backend)
    # On the wrapper itself: torch's OptimizedModule forwards attribute writes to the wrapped model,
    # so two compiles of one model would share (and overwrite) one report.
    object.__setattr__(compiled, "_sparsecomp_backend", backend)
    if cuda_graphs and isinstance(compiled, torch.nn.Module):
        object.__setattr__(compiled, "forward", _graphed(compiled.forward, backend))
    if isinstance(model, torch.nn.Module) and hasattr(model, "generate") and context_parallel:
        object.__setattr__(compiled, "generate", _context_parallel_generate)
    elif isinstance(model, torch.nn.Module) and hasattr(model, "generate"):
        forward = torch.compile(type(model).forward.__get__(model), backend=backend, **torch_compile_kwargs)
        forward = _graphed(forward, backend, "generate") if cuda_graphs else forward
        object.__setattr__(compiled, "generate", _compiled_generate(model, forward, options.plan))
    return compiled


def _context_parallel_generate(*args, **kwargs):
    raise ValueError(
        "a model compiled with context_parallel=True does not run transformers' generate (it would give each "
        "rank's prompt its local positions): prefill with global position_ids, then decode with "
        "sparsecomp.parallel.generate_context_parallel, or gather the cache on one rank "
        "(sparsecomp.parallel.gather_cache) and generate there with a model compiled without context_parallel"
    )


def _graphed(forward, backend: SparsecompBackend, label: str = "forward") -> DecodeStepGraphs:
    steps = DecodeStepGraphs(forward, label=label)
    backend.step_graphs.append(steps)  # the report counts its captures and replays
    return steps


def _compiled_generate(model: torch.nn.Module, compiled_forward, plan):
    """``model.generate`` whose every forward (prefill and each decode step) is ``compiled_forward``.
    A cache that can check the call (a host cache's allocation, a ring's plan) does so first.

    ``generate`` calls ``model(...)``, never the torch.compile wrapper, so the model's own forward is
    swapped for the call. Transformers' own auto-compile of static-cache decoding is turned off: it
    would compile the decode steps again with plain Inductor, around ours."""

    @functools.wraps(model.generate)
    def generate(*args, **kwargs):
        kwargs.setdefault("disable_compile", True)
        cache = kwargs.get("past_key_values", kwargs.get("cache"))  # later releases name it cache
        if hasattr(cache, "check_allocated_for"):  # a HostKVCache: checked here, outside the compiled forward
            cache.check_allocated_for(next(model.parameters()).device)
        if hasattr(cache, "check_generation"):  # a partial cache: StreamingKVCache, EvictingKVCache, PlanKVCache
            cache.check_generation(model, plan, kwargs.get("attention_mask"))
        attached = cache.attached(model) if hasattr(cache, "attached") else contextlib.nullcontext()
        with _forward_replaced(model, compiled_forward), attached:  # evicting layers see the queries
            return model.generate(*args, **kwargs)

    generate.compiled_forward = compiled_forward  # its step graphs' counts, with cuda_graphs=True
    return generate


@contextlib.contextmanager
def _forward_replaced(model: torch.nn.Module, forward):
    had_own = "forward" in model.__dict__
    previous = model.__dict__.get("forward")
    model.forward = forward
    try:
        yield
    finally:
        if had_own:
            model.forward = previous
        else:
            del model.forward


def inspect(compiled=None) -> InspectReport:
    """The report of a model from ``sparsecomp.compile`` (or, with no argument or a model from
    ``torch.compile(..., backend="sparsecomp")``, of the last graph that backend compiled)."""
    backend = getattr(compiled, "_sparsecomp_backend", None) or last_backend()
    if backend is None:
        return InspectReport([])
    return backend.report()
