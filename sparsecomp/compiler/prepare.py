"""Site preparation, one path for compile, calibrate and autotune: find a graph's attention sites,
check the plan against them, and per site the reason it must keep its exact attention (a fallback),
its proven mask structure and one rule per query head."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from sparsecomp.kernels import SUPPORTED_DTYPES, check_head_dim
from sparsecomp.passes.mask import MaskInterpreter, MaskStructure, canonicalize_mask
from sparsecomp.passes.match import find_sites
from sparsecomp.passes.rewrite import KernelOptions, is_plain_causal
from sparsecomp.passes.site import AttentionSite, meta_val

from ..patterns import PATTERNS
from ..plan import Plan, Rule
from ..tuning.cost_model import Workload
from .decide import size_hint


@dataclass
class PreparedSite:
    """A site and what the plan gives it; ``site.fallback`` says why it keeps its attention, else
    ``site.structure`` is its proven mask and ``rules`` has one rule per query head."""

    site: AttentionSite
    rules: list[Rule] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # rules the structure or options turned dense


@dataclass
class PreparedGraph:
    sites: list[PreparedSite]
    warnings: list[str]  # what a non-strict compile reports about ``unmatched``
    unmatched: list[str]  # plan site names this graph does not have


def prepare_graph(
    gm: fx.GraphModule,
    plan: Plan,
    *,
    names_by_id: dict[int, str] | None = None,
    kernel_options: KernelOptions | None = None,
    strict: bool = True,
) -> PreparedGraph:
    """Every site of the graph prepared; the plan's fingerprint and site names checked first."""
    sites = find_sites(gm, names_by_id)
    plan.check_fingerprint(graph_fingerprint(sites))
    warnings = check_plan_sites(plan, sites, strict)
    interp, prepared = MaskInterpreter(), []
    for site in sites:
        site.fallback = site.fallback or fallback_reason(site)  # the matcher's reason first
        if site.fallback is None:
            structure = site_structure(site, interp)
            if isinstance(structure, str):
                site.fallback = structure
            else:
                site.structure = structure
        item = PreparedSite(site)
        if site.fallback is None:
            item.rules, item.notes = head_rules(site, plan, kernel_options or KernelOptions())
        prepared.append(item)
    return PreparedGraph(prepared, warnings, unmatched_plan_sites(plan, sites))


def fallback_reason(site: AttentionSite) -> str | None:
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


def site_structure(site: AttentionSite, interp: MaskInterpreter) -> MaskStructure | str:
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


def head_rules(site: AttentionSite, plan: Plan, options: KernelOptions) -> tuple[list[Rule], list[str]]:
    sh = site.shape
    phase = "decode" if is_decode_step(site) else "prefill"
    rules = plan.rules_for(site.name, sh["q_heads"], sh["kv_heads"], phase)
    notes = []
    if not site.structure.causal and any(r.kind != "dense" for r in rules):
        rules = [Rule() for _ in rules]
        notes.append("sparse rules need a causal site: dense")
    if phase == "decode" and any(r.adaptive for r in rules):
        # The adaptive builders estimate a prefill pattern from many query rows; a decode step has one.
        rules = [Rule() if r.adaptive else r for r in rules]
        notes.append("adaptive rules are prefill patterns: dense at a decode step")
    if not site.structure.positions_are_indices and any(r.adaptive for r in rules):
        rules = [Rule() if r.adaptive else r for r in rules]
        notes.append("adaptive rules need positions that are token indices: those heads dense")
    square = options.block_m == options.block_n
    if not square and (needs := sorted({r.kind for r in rules if PATTERNS[r.kind].square_blocks})):
        rules = [Rule() if r.kind in needs else r for r in rules]
        notes.append(f"{' / '.join(needs)} need block_m == block_n: those heads dense")
    return rules, notes


def graph_fingerprint(sites: list[AttentionSite]) -> dict:
    """The attention shape a graph shows; compared with a plan's fingerprint."""
    sh = next((s.shape for s in sites if meta_val(s.q) is not None and s.form != "cache_group"), None)
    if sh is None:
        return {}
    return {
        "num_attention_heads": sh["q_heads"],
        "num_key_value_heads": sh["kv_heads"],
        "head_dim": sh["head_dim"],
    }


def unmatched_plan_sites(plan: Plan, sites: list[AttentionSite]) -> list[str]:
    """The site names the plan gives rules for that the graph does not have (a graph with no
    attention at all, such as a piece split off by a graph break, is not checked)."""
    found = {s.name for s in sites}
    return [name for name in {**plan.sites, **plan.decode_sites} if found and name not in found]


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
    return [message]


def is_decode_step(site: AttentionSite) -> bool:
    """A few query rows against a longer KV cache (decoding): dense rules keep the original attention.
    The one definition the plan's phase, the backend and the report use."""
    s, sh = site.structure, site.shape
    at_end = s is not None and s.q_at_end
    return at_end or (isinstance(sh["q_len"], int) and sh["q_len"] == 1 and str(sh["kv_len"]) != "1")


def site_workload(site: AttentionSite) -> Workload:
    """The cost model's view of a site. ``masked`` only where dense keeps SDPA's masked path: a mask
    proven plain causal goes to SDPA's fused causal kernels when dense wins, so dense costs that."""
    sh = site.shape
    return Workload(
        batch=size_hint(sh["batch"]), q_heads=sh["q_heads"], kv_heads=sh["kv_heads"], q_len=size_hint(sh["q_len"]),
        kv_len=size_hint(sh["kv_len"]), head_dim=sh["head_dim"], dtype=str(site.dtype).replace("torch.", ""),
        causal=site.structure.causal, masked=site.mask is not None and not is_plain_causal(site),
    )  # fmt: skip


def calibrated_densities(plan: Plan, site: AttentionSite) -> list[float] | None:
    """The kept density calibration measured for each query head of the site, if the plan has it."""
    densities = plan.densities.get(site.name)
    return list(densities) if densities and len(densities) == site.shape["q_heads"] else None
