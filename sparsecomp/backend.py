"""The ``sparsecomp`` Dynamo backend: match sites, decide per site, rewrite, hand to Inductor."""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from sparsecomp.kernels import SUPPORTED_DTYPES, check_head_dim
from sparsecomp.passes.fxutil import eliminate_dead_code
from sparsecomp.passes.mask import MaskInterpreter, MaskStructure, canonicalize_mask
from sparsecomp.passes.match import find_sites
from sparsecomp.passes.rewrite import (
    ADAPTIVE_BUILDERS,
    AdaptiveGroup,
    KernelOptions,
    is_plain_causal,
    rewrite_dense_causal,
    rewrite_site,
)
from sparsecomp.passes.site import AttentionSite, meta_val

from .cost_model import DEFAULT_CONFIG, Workload
from .decide import Decision, SiteDecider, candidate_configs, decide, shape_bucket, size_hint
from .plan import Plan, Rule
from .report import GraphReport, InspectReport, SiteReport, streaming_density

# Every decision bumps a counter; tests assert on them (like torch._dynamo.utils.counters).
counters: collections.Counter = collections.Counter()
INNER_COMPILERS = ("inductor", "aot_eager", "eager")


@dataclass
class BackendOptions:
    plan: Plan = field(default_factory=Plan)
    kernel_options: KernelOptions | None = None  # None: the cost model (or autotune) picks per site
    inner: str = "inductor"  # what compiles the rewritten graph
    cost_model: object = "auto"  # "auto", False (follow the plan) or a CostModel (see decide.load_cost_model)
    tuning_cache: object = None  # a TuningCache; None: this GPU's default cache; False: none
    strict: bool = True  # a plan naming a site the graph does not have is an error (else a warning)

    @classmethod
    def from_any(cls, options) -> BackendOptions:
        if isinstance(options, BackendOptions):
            return options
        options = dict(options or {})
        ko = options.pop("kernel_options", None)
        opts = cls(
            plan=Plan.from_any(options.pop("plan", None)),
            kernel_options=ko if isinstance(ko, KernelOptions) or ko is None else KernelOptions(**ko),
            inner=options.pop("inner", "inductor"),
            cost_model=options.pop("cost_model", "auto"),
            tuning_cache=options.pop("tuning_cache", None),
            strict=options.pop("strict", True),
        )
        if options:
            known = "plan, kernel_options, inner, cost_model, tuning_cache, strict"
            raise ValueError(f"unknown sparsecomp options {sorted(options)}; known: {known}")
        if opts.inner not in INNER_COMPILERS:
            raise ValueError(f"inner={opts.inner!r}; known: {INNER_COMPILERS}")
        if not isinstance(opts.strict, bool):
            raise ValueError(f"strict={opts.strict!r}; give True or False")
        return opts


def _fallback_reason(site: AttentionSite) -> str | None:
    """Why a site must keep its exact original semantics, or None."""
    q, k, v = (meta_val(n) for n in (site.q, site.k, site.v))
    if q is None or k is None or v is None:
        return "no shape information for q/k/v"
    if site.dropout_p != 0:
        return f"dropout_p={site.dropout_p} (training, or not a constant); sparse kernels have no dropout"
    if site.scale is not None and math.isnan(site.scale):
        return "the softmax scale is not a constant of the graph"
    if any(t.requires_grad for t in (q, k, v)) and torch.is_grad_enabled():
        return "q/k/v require grad; sparse kernels have no backward yet"
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes q={q.dtype} k={k.dtype} v={v.dtype}; supported: {[str(d) for d in SUPPORTED_DTYPES]}"
    if (reason := check_head_dim(q.shape[-1])) is not None:
        return reason
    if v.shape[-1] != q.shape[-1]:
        return f"value head_dim {v.shape[-1]} differs from query head_dim {q.shape[-1]}"
    if q.shape[1] % k.shape[1] or k.shape[1] != v.shape[1]:
        return f"query heads {q.shape[1]} are not a multiple of KV heads {k.shape[1]}"
    if site.mask_is_additive:
        return "additive float mask (e.g. a position bias) that is not a keep/remove mask"
    return None


def _structure(site: AttentionSite, interp: MaskInterpreter) -> MaskStructure | str:
    n_q, n_k = site.shape["q_len"], site.shape["kv_len"]
    if site.mask is None:
        if not site.causal and n_q == 1:
            # One query row seeing every key: a decode step after a KV cache (causal, query at the end).
            return MaskStructure(causal=True, q_at_end=True)
        return MaskStructure(causal=site.causal)
    structure = canonicalize_mask(interp, site.mask, n_q, n_k)
    mask = meta_val(site.mask)
    if isinstance(structure, str) and n_q == 1 and mask is not None and mask.dtype == torch.bool:
        if mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1:
            # A mask over one query row is a key mask whatever built it (transformers builds the
            # static cache's decode mask outside the model): causal with the query at the end.
            return MaskStructure(causal=True, q_at_end=True, key_ok=site.mask)
    return structure


def _head_rules(site: AttentionSite, plan: Plan, options: KernelOptions) -> tuple[list[Rule], list[str]]:
    sh = site.shape
    rules = plan.rules_for(site.name, sh["q_heads"], sh["kv_heads"])
    notes = []
    if not site.structure.causal and any(r.kind != "dense" for r in rules):
        rules = [Rule() for _ in rules]
        notes.append("sparse rules need a causal site: dense")
    if not site.structure.positions_are_indices and any(r.adaptive for r in rules):
        rules = [Rule() if r.adaptive else r for r in rules]
        notes.append("adaptive rules need positions that are token indices: those heads dense")
    square = options.block_m == options.block_n
    if not square and any(r.kind in ("vertical_slash", "sample") for r in rules):
        rules = [Rule() if r.kind in ("vertical_slash", "sample") else r for r in rules]
        notes.append("vertical_slash / sample need block_m == block_n: those heads dense")
    return rules, notes


def adaptive_groups(rules: list[Rule]) -> tuple[AdaptiveGroup, ...]:
    """Heads with adaptive rules, grouped by kind and shared parameters (one index builder each)."""
    groups: dict[tuple, list[tuple[int, Rule]]] = {}
    for h, rule in enumerate(rules):
        if rule.adaptive:
            per_head = ADAPTIVE_BUILDERS[rule.kind][1]
            shared = tuple((k, v) for k, v in rule.params if k not in per_head)
            groups.setdefault((rule.kind, shared), []).append((h, rule))
    return tuple(
        AdaptiveGroup(
            kind=kind,
            heads=tuple(h for h, _ in members),
            shared=shared,
            per_head=tuple((name, tuple(getattr(r, name) for _, r in members)) for name in ADAPTIVE_BUILDERS[kind][1]),
        )
        for (kind, shared), members in groups.items()
    )


def _density(site: AttentionSite, rules: list[Rule]) -> float | None:
    n = site.shape["kv_len"]
    if any(r.adaptive for r in rules):
        return None  # known only per input: the recall metric measures it
    if not site.structure.causal or not isinstance(n, int) or site.shape["q_len"] != n:
        return None
    per_head = [1.0 if r.kind == "dense" else streaming_density(n, *r.head_params(n)) for r in rules]
    return sum(per_head) / len(per_head)


def _is_decode_step(site: AttentionSite) -> bool:
    """A few query rows against a longer KV cache (decoding): dense rules keep the original attention."""
    s, sh = site.structure, site.shape
    return s.q_at_end or (isinstance(sh["q_len"], int) and sh["q_len"] == 1 and str(sh["kv_len"]) != "1")


def graph_fingerprint(sites: list[AttentionSite]) -> dict:
    """The attention shape a graph shows; compared with a plan's fingerprint."""
    sh = next((s.shape for s in sites if meta_val(s.q) is not None), None)
    if sh is None:
        return {}
    return {
        "num_attention_heads": sh["q_heads"],
        "num_key_value_heads": sh["kv_heads"],
        "head_dim": sh["head_dim"],
    }


def _share_key(site: AttentionSite, rules: list[Rule]) -> tuple:
    return str((site.shape["q_len"], site.shape["kv_len"])), tuple(str(r) for r in rules if not r.adaptive)


def _workload(site: AttentionSite) -> Workload:
    sh = site.shape
    return Workload(
        batch=size_hint(sh["batch"]), q_heads=sh["q_heads"], kv_heads=sh["kv_heads"], q_len=size_hint(sh["q_len"]),
        kv_len=size_hint(sh["kv_len"]), head_dim=sh["head_dim"], dtype=str(site.dtype).replace("torch.", ""),
        causal=site.structure.causal, masked=site.mask is not None,
    )  # fmt: skip


def _calibrated_densities(plan: Plan, site: AttentionSite) -> list[float] | None:
    heads = plan.info.get("measured", {}).get(site.name, {}).get("heads") or []
    return [h["density"] for h in heads] if len(heads) == site.shape["q_heads"] else None


def _decide(site: AttentionSite, rules: list[Rule], options: BackendOptions, decider: SiteDecider, share: int):
    """Dense or sparse, under which kernel config (see ``sparsecomp.decide``)."""
    forced = options.kernel_options
    model, source, cache = decider.context(meta_val(site.q).device)
    if model is None:
        return Decision(option="forced" if forced else DEFAULT_CONFIG, options=forced or KernelOptions(), source=source)
    w = _workload(site)
    configs = {"forced": forced} if forced else candidate_configs(rules, options.plan.info.get("block"))
    tuned = cache.get(shape_bucket(w, rules)) if cache is not None and not forced else None
    return decide(
        model, source, w, site.shape["kv_len"], rules, configs, densities=_calibrated_densities(options.plan, site),
        static_share=share, site_window=site.structure.window, tuned=tuned,
    )  # fmt: skip


def unmatched_plan_sites(plan: Plan, sites: list[AttentionSite]) -> list[str]:
    """The site names the plan gives rules for that the graph does not have (a graph with no
    attention at all, such as a piece split off by a graph break, is not checked)."""
    found = {s.name for s in sites}
    return [name for name in plan.sites if found and name not in found]


def check_plan_sites(plan: Plan, sites: list[AttentionSite], strict: bool) -> list[str]:
    """Refuse (``strict``) or return as warnings the plan's site names this graph does not have:
    a plan keyed by names the graph spells otherwise would silently give every site the default."""
    unknown = unmatched_plan_sites(plan, sites)
    if not unknown:
        return []
    found = sorted({s.name for s in sites})
    message = (
        f"the plan names {len(unknown)} site(s) the traced graph does not have: {unknown[:8]}"
        f"{' ...' if len(unknown) > 8 else ''}; the graph's sites: {found[:8]}{' ...' if len(found) > 8 else ''}"
    )
    if strict:
        raise ValueError(message + " (strict=False makes this a warning in the report)")
    counters["plan_sites_unmatched"] += len(unknown)
    return [message]


def rewrite_graph(
    gm: fx.GraphModule,
    options: BackendOptions,
    decider: SiteDecider | None = None,
    names_by_id: dict[int, str] | None = None,
    warnings: list[str] | None = None,
) -> list[SiteReport]:
    """Run the passes on a Dynamo graph in place; return one report row per site (and append the
    plan-matching warnings of a non-strict compile to ``warnings``)."""
    sites = find_sites(gm, names_by_id)
    options.plan.check_fingerprint(graph_fingerprint(sites))
    found = check_plan_sites(options.plan, sites, options.strict)
    if warnings is not None:
        warnings.extend(found)
    decider = decider or SiteDecider(options.cost_model, options.tuning_cache)
    # Sites of one shape and static rules share one static index (its cost is split between them).
    share = collections.Counter(
        _share_key(s, options.plan.rules_for(s.name, s.shape["q_heads"], s.shape["kv_heads"]))
        for s in sites
        if meta_val(s.q) is not None
    )
    interp, shared, rows = MaskInterpreter(), {}, []
    counters["graphs"] += 1
    for site in sites:
        counters["sites"] += 1
        site.fallback = _fallback_reason(site)
        if site.fallback is None:
            structure = _structure(site, interp)
            if isinstance(structure, str):
                site.fallback = structure
            else:
                site.structure = structure
        row = SiteReport(
            name=site.name,
            form=site.form,
            shape=site.shape,
            dtype=str(site.dtype).replace("torch.", ""),
            became="kept",
            reason=site.fallback or "",
            gqa_folded=site.gqa_folded,
        )
        rows.append(row)
        if site.fallback is not None:
            counters["kept"] += 1
            continue
        rules, notes = _head_rules(site, options.plan, options.kernel_options or KernelOptions())
        row.rules = [str(r) for r in rules]
        row.mask = site.structure.describe() + "".join(f"; {n}" for n in notes)
        all_dense = all(r.kind == "dense" for r in rules)
        if all_dense and _is_decode_step(site):
            counters["kept_decode"] += 1
            row.reason = "dense decode step: the original attention (its mask is one query row)"
            continue
        decision = _decide(site, rules, options, decider, share[_share_key(site, rules)])
        row.decision = decision
        if (all_dense or decision.dense) and is_plain_causal(site):
            out = rewrite_dense_causal(gm, site)
            out.meta["sparsecomp_site"] = site.name
            counters["dense_sdpa"] += 1
            why = "plan" if all_dense else f"dense is faster here ({decision.source})"
            row.became, row.density = "sdpa_causal", 1.0
            row.reason = f"dense ({why}); mask proven causal: SDPA's fused causal kernels (no N x N mask)"
            continue
        if decision.dense:
            counters["kept_dense_faster"] += 1
            row.reason = f"dense is faster here ({decision.source})"
            continue
        # Elastic windows read the length: a symbolic one is specialized (one graph per length).
        n_keys = int(site.shape["kv_len"]) if any(r.kind == "elastic" for r in rules) else None
        sink, window = zip(*(r.head_params(n_keys) for r in rules), strict=True)
        adaptive = adaptive_groups(rules)
        out = rewrite_site(gm, site, list(sink), list(window), decision.options, shared, adaptive)
        out.meta["sparsecomp_site"] = site.name
        # Only a site with a sparse head is a sparse rewrite; an all-dense one runs the kernel dense
        # (the mask made structure: no N x N tensor).
        counters["dense_kernel" if all_dense else "rewritten"] += 1
        counters["gqa_folded"] += site.gqa_folded
        counters["mask_structured"] += site.mask is not None
        row.became = "dense_attention" if all_dense else "sparse_attention"
        row.density = _density(site, rules)
        row.reason = ("dense rules, mask made structure" if all_dense else "rewritten") + (
            f" (GQA folded, {site.kv_groups} query heads per KV head)" if site.gqa_folded else ""
        )
    eliminate_dead_code(gm)  # keeps in-place KV-cache writes
    gm.recompile()
    return rows


def _inner_compile(gm: fx.GraphModule, example_inputs, inner: str):
    if inner == "eager":
        return gm.forward
    if inner == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    # Inductor calls the sparse op rather than tracing into it (scoped, not a global flip):
    # - on CPU the op is the chunked reference, whose loop would specialise on the sequence length;
    # - on CUDA the launcher reads the strides of the tensors it gets. Traced, it would bake the
    #   strides seen at trace time, and torch 2.11's Inductor only keeps their order: a batch of 2
    #   then read out of bounds on the H100. Opaque, the kernel always sees the real strides.
    with torch._functorch.config.patch(decompose_custom_triton_ops=False):
        return compile_fx(gm, example_inputs)


def inductor_with_opaque_ops(gm: fx.GraphModule, example_inputs):
    """Inductor exactly as this backend runs a rewritten graph (sparse ops opaque), as a Dynamo
    backend of its own: the cost model's fit and the benchmarks compile index builders alone with
    it. (Inductor's default decomposition of the column-mass Triton ops fails under dynamic shapes
    on torch 2.11.)"""
    return _inner_compile(gm, example_inputs, "inductor")


class SparsecompBackend:
    """A Dynamo backend that remembers the reports of the graphs it compiled."""

    def __init__(self, options=None, names_by_id: dict[int, str] | None = None):
        self.options = BackendOptions.from_any(options)
        self.decider = SiteDecider(self.options.cost_model, self.options.tuning_cache)
        self.names_by_id = names_by_id  # the model's named_modules() names, when the model is known
        self.graphs: list[GraphReport] = []

    def __call__(self, gm: fx.GraphModule, example_inputs):
        warnings: list[str] = []
        rows = rewrite_graph(gm, self.options, self.decider, self.names_by_id, warnings)
        self.graphs.append(GraphReport(gm, rows, warnings))
        return _inner_compile(gm, example_inputs, self.options.inner)

    def report(self) -> InspectReport:
        return InspectReport(self.graphs, self.options.plan)


_default_backend: SparsecompBackend | None = None


def sparsecomp_backend(gm: fx.GraphModule, example_inputs, options=None):
    """Entry point for ``torch.compile(model, backend="sparsecomp", options={...})``."""
    global _default_backend
    backend = SparsecompBackend(options)
    _default_backend = backend
    return backend(gm, example_inputs)


def last_backend() -> SparsecompBackend | None:
    return _default_backend
