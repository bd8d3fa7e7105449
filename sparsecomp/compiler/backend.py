"""The ``sparsecomp`` Dynamo backend: match sites, decide per site, rewrite, hand to Inductor."""

from __future__ import annotations

import collections
import copy
import dataclasses
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from sparsecomp.passes.fxutil import eliminate_dead_code
from sparsecomp.passes.match import default_scale
from sparsecomp.passes.rewrite import (
    HeadSelection,
    KernelOptions,
    is_plain_causal,
    rewrite_decode_site,
    rewrite_dense_causal,
    rewrite_site,
)
from sparsecomp.passes.site import AttentionSite, meta_val

from ..patterns import PATTERNS
from ..patterns.local import local_rule_density
from ..patterns.selection import mixed_group, selection_heads
from ..plan import Plan, Rule
from ..report import GraphReport, InspectReport, SiteReport
from ..runtime.decode_state import DecodeStates, state_inputs, update_decode_state, write_prefill_state
from ..tuning.cost_model import DEFAULT_CONFIG, KERNEL_CONFIGS
from .decide import Decision, SiteDecider, candidate_configs, decide, decide_decode, shape_bucket
from .lower import adaptive_groups
from .prepare import calibrated_densities, is_decode_step, prepare_graph, site_workload

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
    mode: str | None = None  # torch.compile's mode for Inductor ("reduce-overhead": CUDA graphs)
    context_parallel: bool = False  # each rank holds a chunk of the sequence (sparsecomp.parallel.compiled)

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
            mode=options.pop("mode", None),
            context_parallel=options.pop("context_parallel", False),
        )
        if options:
            known = "plan, kernel_options, inner, cost_model, tuning_cache, strict, mode, context_parallel"
            raise ValueError(f"unknown sparsecomp options {sorted(options)}; known: {known}")
        if opts.inner not in INNER_COMPILERS:
            raise ValueError(f"inner={opts.inner!r}; known: {INNER_COMPILERS}")
        if not isinstance(opts.strict, bool):
            raise ValueError(f"strict={opts.strict!r}; give True or False")
        if opts.mode is not None:
            import torch._inductor

            torch._inductor.list_mode_options(opts.mode)  # an unknown mode: torch's own error, now
        return opts


def _density(site: AttentionSite, rules: list[Rule]) -> float | None:
    n = site.shape["kv_len"]
    if any(r.adaptive for r in rules):
        return None  # known only per input: the recall metric measures it
    if not site.structure.causal or not isinstance(n, int) or site.shape["q_len"] != n:
        return None
    per_head = [local_rule_density(n, *r.head_params(n)) for r in rules]
    return sum(per_head) / len(per_head)


def _share_key(site: AttentionSite, rules: list[Rule]) -> tuple:
    return str((site.shape["q_len"], site.shape["kv_len"])), tuple(str(r) for r in rules if not r.adaptive)


def _decide(site: AttentionSite, rules: list[Rule], options: BackendOptions, decider: SiteDecider, share: int):
    """Dense or sparse, under which kernel config (see ``sparsecomp.compiler.decide``)."""
    forced = options.kernel_options
    model, source, cache = decider.context(meta_val(site.q).device)
    if model is None:
        if forced:
            return Decision(option="forced", options=forced, source=source)
        # adaptive rules keep what they keep at their calibration block: only configs of that block
        configs = candidate_configs(rules, options.plan.block)
        name = DEFAULT_CONFIG if DEFAULT_CONFIG in configs else next(iter(configs), None)
        block = _adaptive_block(options)
        return Decision(option=name or f"b{block}", options=configs[name] if name else
                        KernelOptions(block_m=block, block_n=block), source=source)  # fmt: skip
    w = site_workload(site)
    configs = {"forced": forced} if forced else candidate_configs(rules, options.plan.block)
    tuned = cache.get(shape_bucket(w, rules)) if cache is not None and not forced else None
    return decide(
        model, source, w, site.shape["kv_len"], rules, configs, densities=calibrated_densities(options.plan, site),
        static_share=share, site_window=site.structure.window, tuned=tuned,
    )  # fmt: skip


def rewrite_graph(
    gm: fx.GraphModule,
    options: BackendOptions,
    decider: SiteDecider | None = None,
    names_by_id: dict[int, str] | None = None,
    warnings: list[str] | None = None,
    states: DecodeStates | None = None,
) -> list[SiteReport]:
    """Run the passes on a Dynamo graph in place; return one report row per site (and append the
    plan-matching warnings of a non-strict compile to ``warnings``). ``states`` holds the decode state
    beside static KV caches (None: a fresh one, for this graph alone)."""
    states = DecodeStates() if states is None else states
    graph = prepare_graph(
        gm, options.plan, names_by_id=names_by_id, kernel_options=options.kernel_options, strict=options.strict
    )
    counters["plan_sites_unmatched"] += len(graph.unmatched)
    if warnings is not None:
        warnings.extend(graph.warnings)
    decider = decider or SiteDecider(options.cost_model, options.tuning_cache)
    # Sites of one shape and static rules share one static index (its cost is split between them).
    share = collections.Counter(_share_key(p.site, p.rules) for p in graph.sites if p.site.fallback is None)
    shared, rows = {}, []
    counters["graphs"] += 1
    for prepared in graph.sites:
        site, rules, notes = prepared.site, prepared.rules, prepared.notes
        counters["sites"] += 1
        row = SiteReport(
            name=site.name,
            form=site.form,
            shape=site.shape,
            dtype=str(site.dtype).replace("torch.", ""),
            became="kept",
            reason=site.fallback or "",
            gqa_folded=site.gqa_folded,
            phase="decode" if is_decode_step(site) else "prefill",
        )
        rows.append(row)
        if site.fallback is not None:
            counters["kept"] += 1
            continue
        row.rules = [str(r) for r in rules]
        row.mask = site.structure.describe() + "".join(f"; {n}" for n in notes)
        all_dense = all(r.kind == "dense" for r in rules)
        if options.context_parallel:  # first: any other attention would read this rank's chunk only
            _rewrite_context_parallel(gm, site, rules, row, options)
            continue
        if all_dense and row.phase == "decode":
            counters["kept_decode"] += 1
            row.reason = "dense decode step: the original attention (its mask is one query row)"
            continue
        if any(PATTERNS[r.kind].selects for r in rules):
            _rewrite_decode_selection(gm, site, rules, options.plan, row, states, decider)
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
        n_keys = int(site.shape["kv_len"]) if any(PATTERNS[r.kind].length_dependent for r in rules) else None
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
    for prepared in graph.sites:
        _write_prefill_state(gm, prepared.site, options.plan, states)
    eliminate_dead_code(gm)  # keeps in-place KV-cache writes (and the decode state's)
    gm.recompile()
    return rows


CONTEXT_PARALLEL_BLOCK = 64  # keys per block moved between ranks (a chunk is whole blocks)
SPREAD_SELECTIONS = ("double_sparsity", "quest")  # decode rules whose choice spreads over the ranks


def _adaptive_block(options: BackendOptions) -> int:
    """The block size of a site with adaptive rules when no cost model chooses (what they keep
    depends on it): forced options', else the plan's calibration block, else the default config's."""
    forced = options.kernel_options
    return forced.block_m if forced else options.plan.block or KERNEL_CONFIGS[DEFAULT_CONFIG].block_m


def _rewrite_context_parallel(
    gm: fx.GraphModule, site: AttentionSite, rules: list[Rule], row, options: BackendOptions
) -> None:
    """A prefill site of a rank's chunk: the context-parallel op over the whole sequence (the
    rank's rules lowered to sink + window per head, at the whole sequence's length)."""
    if row.phase == "decode":
        return _rewrite_context_parallel_decode(gm, site, rules, row, options.plan)
    if not is_plain_causal(site):
        raise ValueError(
            f"context parallel: {site.name} is not a plain causal prefill ({site.structure.describe()}); "
            "give each rank its chunk's input_ids and position_ids, with no padding"
        )
    import torch.distributed as dist

    from ..parallel.compiled import adaptive_groups_spec

    n_keys = int(site.shape["kv_len"]) * dist.get_world_size()
    sink, window = zip(*(r.head_params(n_keys) for r in rules), strict=True)
    groups = adaptive_groups(rules)
    block = _adaptive_block(options) if groups else CONTEXT_PARALLEL_BLOCK
    spec = adaptive_groups_spec(groups, site.shape["q_heads"], KernelOptions(block_m=block, block_n=block))
    args = (site.q, site.k, site.v, list(sink), list(window), float(default_scale(site)), block, site.name, spec)
    _replace_output(gm, site, torch.ops.sparsecomp.context_parallel_attention.default, args)
    counters["rewritten"] += 1
    counters["context_parallel"] += 1
    row.became = "context_parallel"
    row.reason = (
        f"context parallel over {dist.get_world_size()} ranks: this rank's rows over the whole sequence, "
        "receiving only the K/V blocks its index lists"
    )


def _rewrite_context_parallel_decode(
    gm: fx.GraphModule, site: AttentionSite, rules: list[Rule], row, plan: Plan
) -> None:  # fmt: skip
    """A decode step after a context-parallel prefill: every rank attends over its own chunk (and
    the last rank over the decoded tokens too), the partial results merged across the ranks; a
    Double Sparsity or Quest rule (the same on every head) chooses its keys over the whole sequence."""
    s = site.structure
    spread = len(set(rules)) == 1 and rules[0].kind in SPREAD_SELECTIONS  # one selection rule for every head
    unsupported = sorted({r.kind for r in rules if r.adaptive or (PATTERNS[r.kind].selects and not spread)
                          or PATTERNS[r.kind].length_dependent})  # fmt: skip
    if unsupported or s.key_ok is not None or str(site.shape["q_len"]) != "1" or site.softcap or s.window:
        why = f"rules {unsupported}" if unsupported else f"its structure ({s.describe()})"
        raise ValueError(
            f"context parallel decoding takes one token per step, no padding, and dense, streaming, Double "
            f"Sparsity or Quest rules (a selection rule: one for all heads); {site.name} has {why}: join the "
            "chunks on one rank with sparsecomp.parallel.gather_cache and decode there with a model compiled "
            "without context_parallel"
        )
    from ..parallel.compiled import spread_selection_spec

    selection, rules_kind = "", rules[0].kind
    if spread:
        selection = spread_selection_spec(rules[0], site_channels(plan, site, rules[0]))
        rules = [Rule()] * len(rules)  # every key its selection keeps
    sink, window = zip(*(r.head_params(None) for r in rules), strict=True)
    args = (site.q, site.k, site.v, list(sink), list(window), float(default_scale(site)), site.name, selection)
    _replace_output(gm, site, torch.ops.sparsecomp.context_parallel_decode.default, args)
    counters["context_parallel"] += 1
    row.became = "context_parallel"
    row.reason = "decode step: partial attention over this rank's chunk, merged across the ranks" + (
        f"; {rules_kind}'s keys chosen over the whole sequence (each rank's best scores gathered)" if spread else ""
    )


def _replace_output(gm: fx.GraphModule, site: AttentionSite, op, args: tuple) -> None:
    """The site's output becomes ``op(*args)`` (cast back to the output's dtype)."""
    with gm.graph.inserting_before(site.output):
        out = gm.graph.call_function(op, args)
        old = meta_val(site.output)
        if old is not None and old.dtype != site.dtype:
            out = gm.graph.call_method("to", (out, old.dtype))
    site.output.replace_all_uses_with(out)
    out.meta["sparsecomp_site"] = site.name


def _decode_selection_rules(plan: Plan, site: AttentionSite) -> list[Rule]:
    """The selection rules among the site's decode rules (each keeps its state, for every KV head)."""
    sh = site.shape
    rules = plan.rules_for(site.name, sh["q_heads"], sh["kv_heads"], "decode")
    return [r for r in dict.fromkeys(rules) if PATTERNS[r.kind].selects]


def _write_prefill_state(gm: fx.GraphModule, site: AttentionSite, plan: Plan, states: DecodeStates) -> None:
    """A static cache's prefill (more queries than one, fewer than the cache's keys): write the
    decode state of each selection rule of the site's decode rules, whatever became of its attention."""
    n_q = str(site.shape["q_len"])  # may be symbolic (prompts of several lengths)
    if meta_val(site.k) is None or is_decode_step(site) or n_q == "1":
        return
    traced = site  # its queries, keys and mask: what a summary of the prompt's attention reads
    if n_q == str(site.shape["kv_len"]):
        # transformers >= 5.24 hands an empty static cache's prefill only the prompt's keys (a slice
        # of the cache): the state is the whole cache's, from the tensor sliced
        site = _site_on_whole_cache(site)
        if site is None:
            return
    for rule in _decode_selection_rules(plan, site):
        if (key := states.key(site, rule)) is None:
            return
        pattern, params, channels = PATTERNS[rule.kind], dict(rule.params), site_channels(plan, site, rule)
        if pattern.summarize_prompt is not None and not _bool_mask_or_none(traced):
            continue  # which query sees which key is unknown: no votes (its decode steps say so)
        state = states.tensors.get(key) or states.allocate(site, rule, pattern, params, channels)
        write_prefill_state(gm, site, state, pattern, params, channels, prompt_site=traced)
        counters["decode_state_written"] += 1


def _bool_mask_or_none(site: AttentionSite) -> bool:
    mask = None if site.mask is None else meta_val(site.mask)
    return site.mask is None or (mask is not None and mask.dtype == torch.bool)


def _site_on_whole_cache(site: AttentionSite) -> AttentionSite | None:
    """``site`` with K the static cache its K is the leading slice of (``cache[:, :, :n]``, with
    the cache longer than ``n``), or None where K is no such slice."""
    k = site.k
    if not (k.op == "call_function" and k.target is operator.getitem and isinstance(k.args[1], tuple)):
        return None
    source, index = k.args
    whole = meta_val(source) if isinstance(source, fx.Node) else None
    if whole is None or whole.dim() != 4 or len(index) != 4 or not isinstance(whole.shape[2], int):
        return None
    keys = index[2]
    rest_whole = all(isinstance(i, slice) and i == slice(None) for i in (index[0], index[1], index[3]))
    leading = isinstance(keys, slice) and keys.start in (None, 0) and keys.step in (None, 1)
    if not (rest_whole and leading and whole.shape[2] > meta_val(k).shape[2]):
        return None
    return dataclasses.replace(site, k=source)


def site_channels(plan: Plan, site: AttentionSite, rule: Rule) -> tuple | None:
    """The calibrated channels a rule reads at this site, checked against its KV heads and head_dim
    (a rule that needs channels the plan lacks is an error: calibration writes them)."""
    if not PATTERNS[rule.kind].needs_channels:
        return None
    heads = plan.channels.get(site.name)
    hkv, d = site.shape["kv_heads"], site.shape["head_dim"]
    if heads is None:
        raise ValueError(
            f"{rule.kind} at {site.name} needs calibrated channels, and the plan has none for it: make them "
            f"with sparsecomp.calibrate_channels (or give plan.channels[{site.name!r}], one list per KV head)"
        )
    if len(heads) != hkv or any(len(h) != rule.channels or max(h) >= d for h in heads):
        raise ValueError(
            f"plan channels for {site.name}: need {hkv} lists (one per KV head) of {rule.channels} indices "
            f"below head_dim {d}; got {len(heads)} lists of lengths {sorted({len(h) for h in heads})}"
        )
    return tuple(tuple(h) for h in heads)


def queries_after_cache(site: AttentionSite) -> bool:
    """Causal (no window) with query i at key index Nk - Nq + i: what the decode kernel's rule means."""
    s, sh = site.structure, site.shape
    if not s.causal or s.window or not s.positions_are_indices:
        return False
    return s.q_at_end or str(s.q_offset) == str(sh["kv_len"] - sh["q_len"])


def _selection_groups(site: AttentionSite, rules: list[Rule]) -> tuple[int, list[Rule]]:
    """(selection heads, the rule of each) of a decode site with a selection rule: every selection
    rule selects per KV group (or every one per query head), the query heads sharing a selection
    share its rule, and the other rules are local (sink + window) ones. Anything else: ValueError."""
    sh, selecting = site.shape, [r for r in rules if PATTERNS[r.kind].selects]
    layouts = {selection_heads(dict(r.params)["heads"], sh["q_heads"], sh["kv_heads"]) for r in selecting}
    if len(layouts) > 1:
        raise ValueError(f"{site.name}: its decode selection rules select per KV group and per query head at once")
    n_sel = layouts.pop()
    group = sh["q_heads"] // n_sel
    if mixed := mixed_group(rules, group):
        hs, shared = mixed
        raise ValueError(
            f"{site.name}: query heads {hs * group}-{(hs + 1) * group - 1} share one selection and need one "
            f"decode rule; got {shared}"
        )
    head_rules = rules[::group]
    for r in set(head_rules):
        if not PATTERNS[r.kind].selects and (PATTERNS[r.kind].adaptive or r.kind == "dense"):
            raise ValueError(
                f"{site.name}: a decode site mixes selection rules only with sink + window rules; got {r} "
                f"(a dense head there: give it the selection rule with ratio=1)"
            )
    return n_sel, head_rules


def _rewrite_decode_selection(
    gm: fx.GraphModule, site: AttentionSite, rules: list[Rule], plan: Plan, row, states: DecodeStates,
    decider: SiteDecider,
) -> None:  # fmt: skip
    """A decode step whose rules select tokens (Double Sparsity, Quest; per KV group, beside sink +
    window rules on other groups): selection + decode kernel, where the decode cost model (if any)
    predicts each selection rule faster than the dense step."""
    n_sel, head_rules = _selection_groups(site, rules)
    distinct = list(dict.fromkeys(head_rules))
    kinds = "+".join(dict.fromkeys(r.kind for r in distinct))
    if row.phase != "decode" or not queries_after_cache(site):
        counters["kept_decode"] += 1
        row.reason = f"{kinds} is a decode rule and this site is not a causal decode step after a KV cache: kept"
        return
    if len(distinct) > 1 and str(site.shape["q_len"]) != "1":
        counters["kept_decode"] += 1
        row.reason = (
            f"{kinds}: a window beside a selection needs one query row per step (got {site.shape['q_len']}): kept"
        )
        return
    model, source, _ = decider.context(meta_val(site.q).device)
    whys = [source]
    if model is not None and model.decode is not None:
        whys = []
        for rule in (r for r in distinct if PATTERNS[r.kind].selects):
            select, why = decide_decode(model.decode, source, site, rule)
            if not select:
                counters["kept_dense_faster"] += 1
                row.reason = f"{rule.kind}: the dense step is faster here ({why}): the original attention"
                return
            whys.append(why)
    n_keys = int(site.shape["kv_len"]) if any(PATTERNS[r.kind].length_dependent for r in distinct) else None
    parts, kept_state = [], []
    for rule in distinct:
        heads = tuple(hs for hs, r in enumerate(head_rules) if r == rule)
        pattern, params = PATTERNS[rule.kind], dict(rule.params)
        if not pattern.selects:
            sink, window = rule.head_params(n_keys)
            parts.append(HeadSelection(heads, sink=sink, window=window))
            continue
        channels = site_channels(plan, site, rule)
        state = states.tensors.get(states.key(site, rule) or ())
        if state is None and pattern.summarize_prompt is not None:
            counters["kept_decode"] += 1
            row.reason = (
                f"{rule.kind} attends to what the prompt's attention chose: that needs a static cache "
                "(cache_implementation='static') and a keep/drop prompt mask; no prompt state here: "
                "the original attention (over an EvictingKVCache: the keys it holds, which are the rule's)"
            )
            return
        if state is not None:  # kept beside the static cache: this step writes its own key's unit
            state = update_decode_state(gm, site, state, pattern, params, channels)
        kept_state.append(state is not None)
        parts.append(HeadSelection(heads, pattern, params, channels, state))
    out = rewrite_decode_site(gm, site, parts, n_sel)
    out.meta["sparsecomp_site"] = site.name
    counters["rewritten"] += 1
    counters["sparse_decode"] += 1
    counters["sparse_decode_cached_state" if all(kept_state) else "sparse_decode_state_from_k"] += 1
    row.became = "sparse_decode"
    kept = "its state kept beside the static cache" if all(kept_state) else "its state summarized from K each step"
    row.reason = f"{kinds}: the selected tokens only (split-K decode kernel); {kept} ({'; '.join(whys)})"


def _static_fakes(example_inputs, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` as static-shaped fakes of Dynamo's fake mode. Handed over real, AOT would fake
    them with fresh size symbols that no Dynamo input owns; a guard Inductor then puts on them (its
    32-bit indexing check, on CUDA) cannot be written and the compile fails."""
    mode = torch._guards.detect_fake_mode(example_inputs)
    return tensors if mode is None else [mode.from_tensor(t, static_shapes=True) for t in tensors]


def _inner_compile(gm: fx.GraphModule, example_inputs, inner: str, mode: str | None = None):
    if inner == "eager":
        return gm.forward
    if inner == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    # Inductor calls the sparse ops rather than tracing into them: they are custom ops (see
    # kernels/__init__.py); the patch keeps any Triton op opaque too (scoped, not a global flip).
    config = torch._inductor.list_mode_options(mode) if mode else {}  # e.g. CUDA graphs
    with torch._functorch.config.patch(decompose_custom_triton_ops=False):
        return compile_fx(gm, example_inputs, config_patches=config)


def inductor_with_opaque_ops(gm: fx.GraphModule, example_inputs):
    """Inductor exactly as this backend runs a rewritten graph (sparse ops opaque), as a Dynamo
    backend of its own: the cost model's fit and the benchmarks compile index builders alone with
    it. (Inductor's default decomposition of the column-mass Triton ops fails under dynamic shapes
    on torch 2.11.)"""
    return _inner_compile(gm, example_inputs, "inductor")


def _copy_dynamo_graph(gm: fx.GraphModule) -> fx.GraphModule:
    graph = copy.deepcopy(gm.graph)
    for old, new in zip(gm.graph.find_nodes(op="placeholder"), graph.find_nodes(op="placeholder"), strict=True):
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    out = fx.GraphModule(gm, graph)
    out.meta = dict(gm.meta)  # "dynamo_compile_id": AOT then reads the sources
    if hasattr(gm, "_param_name_to_source"):
        out._param_name_to_source = gm._param_name_to_source
    return out


class SparsecompBackend:
    """A Dynamo backend that remembers the reports of the graphs it compiled."""

    def __init__(self, options=None, names_by_id: dict[int, str] | None = None):
        self.options = BackendOptions.from_any(options)
        self.decider = SiteDecider(self.options.cost_model, self.options.tuning_cache)
        self.names_by_id = names_by_id  # the model's named_modules() names, when the model is known
        self.graphs: list[GraphReport] = []
        self.states = DecodeStates()  # shared by the prefill and decode graphs of one model
        self.step_graphs: list = []  # the CUDA-graph wrappers of its decode steps (cuda_graphs=True)

    def __call__(self, gm: fx.GraphModule, example_inputs):
        # Rewrite a copy: Dynamo reads its graph's inputs after this returns, and decode state may
        # add inputs of its own. Dynamo's input sources go along: AOT reads from them which inputs
        # are static (weights, the KV cache), so that CUDA graphs never copy those.
        gm = _copy_dynamo_graph(gm)
        warnings: list[str] = []
        rows = rewrite_graph(gm, self.options, self.decider, self.names_by_id, warnings, self.states)
        self.graphs.append(GraphReport(gm, rows, warnings))
        extra = state_inputs(gm)  # decode state beside a static cache, passed after the graph's inputs
        compiled = _inner_compile(gm, [*example_inputs, *_static_fakes(example_inputs, extra)], self.options.inner,
                                  self.options.mode)  # fmt: skip
        if not extra:
            return compiled
        return lambda *args: compiled(*args, *extra)

    def report(self) -> InspectReport:
        return InspectReport(self.graphs, self.options.plan, self.states, self.step_graphs)


_default_backend: SparsecompBackend | None = None


def sparsecomp_backend(gm: fx.GraphModule, example_inputs, options=None):
    """Entry point for ``torch.compile(model, backend="sparsecomp", options={...})``."""
    global _default_backend
    backend = SparsecompBackend(options)
    _default_backend = backend
    return backend(gm, example_inputs)


def last_backend() -> SparsecompBackend | None:
    return _default_backend
