"""Per-site decisions: keep the dense attention, or run the sparse kernel under which config.

The cost model predicts each option at the traced length; a length that is symbolic (a dynamic
compile) is decided by the crossover length instead, through a guard ``N >= crossover``: a length
on the other side compiles the other choice once, never one graph per length. A stored autotune
result for the site's shape bucket replaces the prediction with measured times.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from sparsecomp.passes.rewrite import KernelOptions

from ..plan import Rule
from ..tuning.cost_model import DEFAULT_CONFIG, DENSE, KERNEL_CONFIGS, CostModel, Workload, ranked
from ..tuning.decode_cost import DecodeCostModel, DecodeWork

COST_MODEL_ENTRY = "cost_model"


@dataclass
class Decision:
    option: str  # DENSE, a KERNEL_CONFIGS name, or "forced" (the user's kernel_options)
    options: KernelOptions | None  # None: keep the dense attention
    source: str  # what decided: "cost model (...)", "autotune", or why nothing did
    predicted_ms: float | None = None
    runner_up: str | None = None
    runner_up_ms: float | None = None
    crossover: int | None = None

    @property
    def dense(self) -> bool:
        return self.options is None


def size_hint(n) -> int:
    """The example value of a (possibly symbolic) size, without adding a guard."""
    if isinstance(n, torch.SymInt):
        return int(n.node.hint)
    return int(n)


def shape_bucket(w: Workload, rules: list[Rule]) -> str:
    """The autotune cache key of a site: everything but the exact length (rounded up to a power of
    two); the rules enter as a digest (density decides the best config)."""
    digest = hashlib.sha256("|".join(map(str, rules)).encode()).hexdigest()[:12]
    n = 1 << max(0, (max(w.q_len, w.kv_len) - 1).bit_length())
    form = "masked" if w.masked else ("causal" if w.causal else "full")
    return f"{w.dtype} b{w.batch} h{w.q_heads}/{w.kv_heads} d{w.head_dim} n<={n} {form} rules:{digest}"


def candidate_configs(rules: list[Rule], block: int | None) -> dict[str, KernelOptions]:
    """The configs a site may take: any for static rules (exact at every block size); for adaptive
    ones only those at the block size the plan was calibrated at (what they keep depends on it)."""
    if not any(r.adaptive for r in rules):
        return dict(KERNEL_CONFIGS)
    block = block or KERNEL_CONFIGS[DEFAULT_CONFIG].block_m
    return {n: o for n, o in KERNEL_CONFIGS.items() if o.block_m == block and o.block_n == block}


def decide(
    model: CostModel,
    source: str,
    w: Workload,
    n_symbolic,
    rules: list[Rule],
    configs: dict[str, KernelOptions],
    *,
    densities: list[float] | None = None,
    static_share: int = 1,
    site_window: int = 0,
    tuned: dict | None = None,
) -> Decision:
    """The option for one site. ``n_symbolic``: the site's key length as traced (an int or a
    SymInt); ``tuned``: a stored autotune entry for this bucket (measured ms per option)."""
    preds = model.predictions(w, rules, configs, densities, static_share, site_window)
    times = {p.option: p.ms for p in preds}
    if tuned:
        measured = {k: v for k, v in tuned["ms"].items() if k == DENSE or k in configs}
        if measured:
            times, source = measured, f"autotune (measured at N={tuned.get('length')})"
    order = ranked(times)
    crossover = model.crossover(w, rules, configs, densities, static_share, site_window)
    best = order[0]
    if isinstance(n_symbolic, torch.SymInt):
        # One graph per side of the crossover: the guard makes a length past it compile the other side.
        sparse = crossover is not None and bool(n_symbolic >= crossover)
        if sparse and best == DENSE:
            best = next((o for o in order if o != DENSE), DENSE)
        elif not sparse:
            best = DENSE
    runner = next((o for o in order if o != best), None)
    return Decision(
        option=best,
        options=None if best == DENSE else configs[best],
        source=source,
        predicted_ms=times.get(best),
        runner_up=runner,
        runner_up_ms=times.get(runner) if runner else None,
        crossover=crossover,
    )


def load_cost_model(setting, device: torch.device, cache) -> tuple[CostModel | None, str]:
    """The cost model a compile uses, and what the report says about it. ``setting``: "auto" (the
    coefficients fitted on this GPU by ``sparsecomp autotune``, else the shipped fit on a Hopper GPU:
    the H200's on an H200, the H100's on the others; off on other GPUs until tuned, and where the op
    runs the PyTorch reference), False (off: the plan is followed), or a CostModel."""
    if isinstance(setting, CostModel):
        return setting, "cost model (given)"
    if setting is False or setting is None:
        return None, "cost model off: the plan is followed"
    if setting != "auto":
        raise ValueError(f"cost_model={setting!r}; expected 'auto', False or a CostModel")
    if device.type != "cuda":
        return None, f"no cost model on {device.type} (the op runs the PyTorch reference): the plan is followed"
    from ..tuning.cost_defaults import H200_DECODE_COST_MODEL, shipped_fit

    hopper = torch.cuda.get_device_capability(device)[0] == 9  # the shipped fits describe Hopper only
    stored = cache.get(COST_MODEL_ENTRY) if cache is not None else None
    if stored is not None:
        model = CostModel.from_json(stored)
        if model.decode is None and hopper:  # autotune fits prefill only
            model.decode = DecodeCostModel.from_json(H200_DECODE_COST_MODEL)
        return model, "cost model (fitted on this GPU)"
    if not hopper:
        return None, "no cost model fitted for this GPU (run sparsecomp autotune): the plan is followed"
    prefill, fit = shipped_fit(torch.cuda.get_device_name(device))
    model = CostModel.from_json({**prefill, "decode": H200_DECODE_COST_MODEL})
    return model, f"cost model ({fit}, decode: H200 fit; run sparsecomp autotune to fit this GPU)"


def decide_decode(model: DecodeCostModel, source: str, site, rule: Rule) -> tuple[bool, str]:
    """(select, why) for a decode selection rule: the selection where predicted faster than the
    dense step at the site's key count (a symbolic count: past the crossover, through a guard)."""
    from ..patterns.selection import budget, selection_heads

    sh, params = site.shape, dict(rule.params)
    count = params.get("k", params.get("pages", 0))

    def work_at(n: int) -> DecodeWork:
        unit = params.get("page", 1)
        selected = budget(count, params["ratio"], -(-n // unit)) * unit
        return DecodeWork(
            batch=size_hint(sh["batch"]), kv_heads=sh["kv_heads"],
            sel_heads=selection_heads(params["heads"], sh["q_heads"], sh["kv_heads"]), n_keys=n,
            head_dim=sh["head_dim"], element_bytes=site.dtype.itemsize, selected=selected, kind=rule.kind,
            channels=params.get("channels", 0), page=params.get("page", 0),
        )  # fmt: skip

    n = sh["kv_len"]
    at = work_at(size_hint(n))
    dense, selection = model.dense_ms(at), model.selection_ms(at)
    why = f"predicted {selection:.4f} ms vs dense {dense:.4f} ms at {size_hint(n)} keys, {source}"
    if isinstance(n, torch.SymInt):
        crossover = model.crossover(work_at)
        select = crossover is not None and bool(n >= crossover)
        return select, f"{why}; crossover {crossover} keys"
    return selection < dense, why


class SiteDecider:
    """Resolves, once per device, the cost model and tuning cache a compile decides with."""

    def __init__(self, cost_model="auto", tuning_cache=None):
        self.cost_model, self.tuning_cache = cost_model, tuning_cache
        self._resolved: dict[str, tuple] = {}

    def context(self, device: torch.device) -> tuple[CostModel | None, str, object]:
        if str(device) not in self._resolved:
            cache = self.tuning_cache
            if cache is None and device.type == "cuda":
                from ..tuning.tuning_cache import TuningCache, environment_key

                cache = TuningCache(environment_key(device))
            cache = cache or None  # False: no cache
            model, source = load_cost_model(self.cost_model, device, cache)
            self._resolved[str(device)] = (model, source, cache)
        return self._resolved[str(device)]
