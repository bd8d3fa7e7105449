"""Per-GPU tuning: fit the cost model's coefficients, and time each site's options ahead of time.

``fit_cost_model`` runs a short micro-benchmark (SDPA, SDPA with a mask, each kernel config on
random block indexes at a few lengths and densities, each index builder compiled) and fits the
roofline coefficients of ``cost_model``. ``autotune(model, example_inputs)`` runs the model once
with every site observed, keeps one site's tensors per shape bucket, times dense and every
candidate config on them, and stores the result (and the fit) in this GPU's ``TuningCache``;
``sparsecomp.compile`` then decides with the stored times.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from sparsecomp.kernels import SparseIndex, build_block_index, sparse_attention_call
from sparsecomp.kernels.prefill.block_sparse_attention import structure_pairs
from sparsecomp.passes.fxutil import eliminate_dead_code
from sparsecomp.passes.rewrite import KernelOptions, observe_site
from sparsecomp.passes.site import module_names_by_id

from ..calibration.calibrate import _progress
from ..compiler.backend import inductor_with_opaque_ops
from ..compiler.decide import COST_MODEL_ENTRY, candidate_configs, shape_bucket
from ..compiler.lower import lower_rules
from ..compiler.prepare import calibrated_densities, prepare_graph, site_workload
from ..patterns import PATTERNS
from ..plan import Plan, Rule
from .cost_model import (
    DEFAULT_CONFIG,
    DENSE,
    KERNEL_CONFIGS,
    BlockCounts,
    CostModel,
    Workload,
    dense_counts,
    engine_features,
    fit_coefficients,
    index_work,
    static_block_counts,
)
from .timing import median_ms
from .tuning_cache import TuningCache, environment_key


def random_selection(heads: int, n: int, density: float, block: int, device, seed: int = 0) -> torch.Tensor:
    """(heads, nb, nb) bool over ``block``-sized causal blocks: the diagonal plus random earlier
    blocks, ``density`` of the causal blocks in all."""
    nb = -(-n // block)
    gen = torch.Generator(device=device).manual_seed(seed)
    causal_blocks = nb * (nb + 1) / 2
    p = max(0.0, (density * causal_blocks - nb) / max(1.0, causal_blocks - nb))
    qb, kb = torch.arange(nb, device=device)[:, None], torch.arange(nb, device=device)[None]
    return ((torch.rand(heads, nb, nb, generator=gen, device=device) < p) & (kb < qb)) | (kb == qb)


def selection_index(
    selection: torch.Tensor, selection_block: int, block: int, n: int, tile_m: int = 0
) -> tuple[SparseIndex, BlockCounts]:
    """A selection's pairs as an index of ``block``-sized blocks (a divisor of ``selection_block``;
    diagonal blocks masked, the rest full), and its exact block counts (programs of ``tile_m``
    query rows; 0 = a block)."""
    f = selection_block // block
    nb = -(-n // block)
    keep = selection.repeat_interleave(f, 1).repeat_interleave(f, 2)[:, :nb, :nb]  # a partial last block ends early
    heads = keep.shape[0]
    qb, kb = torch.arange(nb, device=keep.device)[:, None], torch.arange(nb, device=keep.device)[None]
    keep = keep & (kb <= qb)

    def compact(sel):
        order = torch.sort((~sel).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
        return order[None].contiguous(), sel.sum(-1, dtype=torch.int32)[None]

    (fb, fc), (pb, pc) = compact(keep & (kb < qb)), compact(keep & (kb == qb))
    tile_m = tile_m or block
    counts = BlockCounts(block, block, float(fc.sum()), float(pc.sum()), float((fc + pc).max()),
                         heads * -(-n // tile_m), tile_m)  # fmt: skip
    return SparseIndex(fb, fc, pb, pc, block, block), counts


def run_sparse(q, k, v, index: SparseIndex, options: KernelOptions, *, scale=None, q_pos=None, k_pos=None,
               key_ok=None, head_sink=None, head_window=None, causal=True, window=0):  # fmt: skip
    """The sparse op on ``index`` under ``options`` (as the rewritten graph calls it)."""
    dev = q.device
    q_pos = torch.arange(k.shape[2] - q.shape[2], k.shape[2], device=dev)[None] if q_pos is None else q_pos
    k_pos = torch.arange(k.shape[2], device=dev)[None] if k_pos is None else k_pos
    return sparse_attention_call(
        q, k, v, index, q_pos=q_pos, k_pos=k_pos, key_ok=key_ok, head_sink=head_sink, head_window=head_window,
        scale=scale, causal=causal, window=window, options=options,
    )  # fmt: skip


def _qkv(batch, hq, hkv, n, d, dtype, device):
    gen = torch.Generator(device=device).manual_seed(n + d)
    return [torch.randn(batch, h, n, d, generator=gen, device=device, dtype=dtype) for h in (hq, hkv, hkv)]


def _index_calls(w: Workload, q, k, block: int) -> dict:
    """(builder, args, kwargs) per index builder kind at this shape: the static index, and each
    adaptive pattern's builder on its default rule."""
    dev, hq = q.device, q.shape[1]
    pos = torch.arange(w.kv_len, device=dev)[None]
    sink, window = torch.tensor([64], device=dev), torch.tensor([1024], device=dev)
    common = dict(causal=True, window=0, block_m=block, block_n=block)
    calls = {"static": (build_block_index, (pos, pos, None, sink, window), dict(max_blocks=None, **common))}
    for kind, pattern in PATTERNS.items():
        if pattern.adaptive:
            rule = Rule(kind)
            per_head = [[getattr(rule, name)] * hq for name in pattern.per_head]
            shared = {name: value for name, value in rule.params if name not in pattern.per_head}
            kwargs = dict(shared, scale=w.head_dim**-0.5, **common)
            calls[kind] = (pattern.builder, (q, k, pos, pos, None, *per_head), kwargs)
    return calls


STREAMING_FIT_RULE = (64, 1024)  # (sink, window) of the fit's streaming points


@dataclass
class FitResult:
    model: CostModel
    rows: list[dict] = field(default_factory=list)  # every micro-benchmark point: measured and fitted ms


def fit_cost_model(
    head_dims=(64, 128),
    *,
    dtype=torch.bfloat16,
    configs: dict[str, KernelOptions] | None = None,
    # 2K: where dense / sparse crossovers fall (1K and 4K alone left 2K under-predicted by 5-15%);
    # 64K: long rows pin the per-block rate (16K alone left +5-9% at 32K+)
    lengths=(1024, 2048, 4096, 16384, 65536),
    densities=(0.05, 0.3, 1.0),
    heads=(32, 8),
    index_lengths=(1024, 4096, 16384, 65536),  # 1K pins the fixed cost of a compiled builder
    device="cuda",
    progress: bool = True,
) -> FitResult:
    """Micro-benchmark this GPU and fit the cost model (about a minute on an H100)."""
    device = torch.device(device)
    if device.type != "cuda":
        raise RuntimeError(f"fit_cost_model times GPU kernels; got device {device}")
    configs = configs or KERNEL_CONFIGS
    hq, hkv = heads
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    samples: dict[tuple[str, int], list[tuple[list[float], float, dict]]] = {}
    jobs = [(d, n) for d in head_dims for n in lengths]
    for d, n in _progress(jobs, progress, "fitting cost model"):
        for key, features, t, info in _engine_points(hq, hkv, n, d, dtype, device, configs, densities, sms):
            samples.setdefault(key, []).append((features, t, info))
    engines: dict[str, dict[int, list[float]]] = {}
    rows = []
    for (engine, d), points in samples.items():
        coef = fit_coefficients([f for f, _, _ in points], [t for _, t, _ in points])
        engines.setdefault(engine, {})[d] = coef
        for f, t, info in points:
            predicted = sum(c * x for c, x in zip(coef, f, strict=True))
            rows.append({"engine": engine, "head_dim": d, **info, "ms": t, "fitted_ms": predicted})
    index = _fit_index(hq, hkv, max(head_dims), dtype, index_lengths, device, progress, rows)
    info = {
        "gpu": torch.cuda.get_device_name(device),
        "head_dims": list(head_dims),
        "heads": [hq, hkv],
        "dtype": str(dtype).replace("torch.", ""),
        "lengths": list(lengths),
        "densities": list(densities),
    }
    return FitResult(CostModel(engines, index, sms, info), rows)


def _engine_points(hq, hkv, n, d, dtype, device, configs, densities, sms):
    """Micro-benchmark points at one (length, head_dim): ((engine, head_dim), features, ms, info)."""
    dtype_name = str(dtype).replace("torch.", "")
    w = Workload(1, hq, hkv, n, n, d, dtype_name)
    q, k, v = _qkv(1, hq, hkv, n, d, dtype, device)
    k_rep, v_rep = (t.repeat_interleave(hq // hkv, 1) for t in (k, v))
    t = median_ms(lambda: F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=True))
    yield ("sdpa", d), engine_features(w, dense_counts(w), sms), t, {"n": n}
    if n <= 8192:  # the masked path materializes an N x N mask
        mask = torch.ones(n, n, dtype=torch.bool, device=device).tril()
        wm = Workload(1, hq, hkv, n, n, d, dtype_name, masked=True)
        t = median_ms(lambda: F.scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=mask))
        yield ("sdpa_masked", d), engine_features(wm, dense_counts(wm), sms), t, {"n": n}
    # Streaming also masks window edges and a partial sink block: random selections mask only the
    # diagonal (one block per query block, like the program count), so alone they leave the mask
    # rate unidentifiable (fitted 0; streaming at 2K-4K then came out 15-20% low).
    pos = torch.arange(n, device=device)[None]
    streaming = Rule("streaming", sink=STREAMING_FIT_RULE[0], window=STREAMING_FIT_RULE[1])
    sink, window = (torch.full((hq,), x, dtype=torch.int32, device=device) for x in STREAMING_FIT_RULE)
    for name, options in configs.items():
        for density in densities:
            selection = random_selection(hq, n, density, options.block_m, device)
            index, counts = selection_index(selection, options.block_m, options.block_m, n, options.tile_m)
            t = median_ms(lambda: run_sparse(q, k, v, index, options))  # noqa: B023
            yield (name, d), engine_features(w, counts, sms), t, {"n": n, "density": density, "pattern": "random"}
        blocks = dict(causal=True, window=0, block_m=options.block_m, block_n=options.block_n, max_blocks=None)
        index = build_block_index(pos, pos, None, sink[:1], window[:1], **blocks)
        counts = static_block_counts(w, [streaming] * hq, options)
        t = median_ms(lambda: run_sparse(q, k, v, index, options, head_sink=sink, head_window=window))  # noqa: B023
        info = {"n": n, "density": round(counts.density(w), 3), "pattern": "streaming"}
        yield (name, d), engine_features(w, counts, sms), t, info


def _fit_index(hq, hkv, d, dtype, lengths, device, progress, rows) -> dict[str, list[float]]:
    """Index builder coefficients, each builder compiled as the backend compiles a graph (dynamic
    shapes, sparse ops opaque, one graph: a graph break would time host-bound pieces)."""
    block = KERNEL_CONFIGS[DEFAULT_CONFIG].block_m
    samples: dict[str, list[tuple[list[float], float]]] = {}
    compiled: dict[str, object] = {}
    for n in _progress(list(lengths), progress, "fitting index builders"):
        w = Workload(1, hq, hkv, n, n, d, str(dtype).replace("torch.", ""))
        q, k, _ = _qkv(1, hq, hkv, n, d, dtype, device)
        for kind, (builder, args, kwargs) in _index_calls(w, q, k, block).items():
            timed = compiled.setdefault(
                kind, torch.compile(builder, backend=inductor_with_opaque_ops, dynamic=True, fullgraph=True)
            )
            try:
                t = median_ms(lambda: timed(*args, **kwargs))  # noqa: B023
            except Exception as e:  # a builder that does not compile is timed as it is
                print(f"index builder {kind}: compiled timing failed ({type(e).__name__}); eager", file=sys.stderr)
                t = median_ms(lambda: builder(*args, **kwargs))  # noqa: B023
            samples.setdefault(kind, []).append(([1.0, index_work(kind, w, None, block) * 1e-9], t))
            rows.append({"engine": f"index:{kind}", "head_dim": d, "n": n, "ms": t})
    return {kind: fit_coefficients([f for f, _ in pts], [t for _, t in pts]) for kind, pts in samples.items()}


# ---- autotune a model -------------------------------------------------------------------------


@dataclass
class CapturedSite:
    """One site's real inputs (the first site seen of its shape bucket) and what compile would do."""

    names: list[str]
    workload: Workload
    rules: list[Rule]
    densities: list[float] | None
    tensors: tuple  # q, k, v, q_pos, k_pos, key_ok
    structure: dict  # scale, causal, window


def capture_sites(model, example_inputs, plan: Plan) -> dict[str, CapturedSite]:
    """Run the model once with every rewritable site observed; one CapturedSite per shape bucket."""
    captured: dict[str, CapturedSite] = {}
    pending: dict[str, tuple] = {}  # site name -> (bucket, workload, rules, densities)

    def observer(out, q, k, v, q_pos, k_pos, key_ok, *, site, scale, causal, window):
        bucket, w, rules, densities = pending[site]
        if bucket in captured:
            captured[bucket].names.append(site)
        else:
            structure = dict(scale=scale, causal=causal, window=window)
            captured[bucket] = CapturedSite([site], w, rules, densities, (q, k, v, q_pos, k_pos, key_ok), structure)
        return out

    names_by_id = module_names_by_id(model)

    def backend(gm, example):
        for prepared in prepare_graph(gm, plan, names_by_id=names_by_id).sites:
            site, rules = prepared.site, prepared.rules
            if site.fallback is not None:
                continue  # compile keeps it as it is: nothing to tune
            w = site_workload(site)
            pending[site.name] = (shape_bucket(w, rules), w, rules, calibrated_densities(plan, site))
            observe_site(gm, site, observer)
        eliminate_dead_code(gm)  # keeps in-place KV-cache writes
        gm.recompile()
        return gm.forward

    observed = torch.compile(model, backend=backend, dynamic=False)
    with torch.no_grad():
        observed(*example_inputs) if isinstance(example_inputs, (tuple, list)) else observed(example_inputs)
    torch._dynamo.reset()
    return captured


def site_index(site: CapturedSite, options: KernelOptions) -> SparseIndex:
    """The index the rewritten graph would build for this site (eagerly)."""
    q, k, _, q_pos, k_pos, key_ok = site.tensors
    return lower_rules(site.rules, q, k, q_pos, k_pos, key_ok, **site.structure, options=options)[0]


def _dense_call(site: CapturedSite):
    """The dense attention as the site runs it when kept (SDPA; K/V repeated for GQA beforehand)."""
    q, k, v, q_pos, k_pos, key_ok = site.tensors
    s = site.structure
    k_rep, v_rep = (t.repeat_interleave(q.shape[1] // k.shape[1], 1) for t in (k, v))
    if not site.workload.masked:
        return lambda: F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=s["causal"], scale=s["scale"])
    mask = structure_pairs(q_pos, k_pos, key_ok, causal=s["causal"], window=s["window"])
    mask = mask.reshape(mask.shape[0], 1, *mask.shape[-2:])  # (B or 1, 1, Nq, Nk): one mask for every head
    return lambda: F.scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=mask, scale=s["scale"])


def _sparse_call(site: CapturedSite, options: KernelOptions):
    """The sparse op on the site's tensors under ``options``, its index prebuilt."""
    q, k, v, q_pos, k_pos, key_ok = site.tensors
    s = site.structure
    index = site_index(site, options)
    sink, window = zip(*(r.head_params(site.workload.kv_len) for r in site.rules), strict=True)
    sink, window = (torch.tensor(x, dtype=torch.int32, device=q.device) for x in (sink, window))
    local = dict(scale=s["scale"], q_pos=q_pos, k_pos=k_pos, key_ok=key_ok, head_sink=sink, head_window=window)
    return lambda: run_sparse(q, k, v, index, options, causal=s["causal"], window=s["window"], **local)


def time_site(site: CapturedSite, model: CostModel, configs: dict[str, KernelOptions], timer=median_ms) -> dict:
    """Measured kernel ms of dense and each config on the site's tensors; sparse options add the
    cost model's index time (compiled builders, the static index shared by the bucket's sites)."""
    w = site.workload
    kernel = {DENSE: timer(_dense_call(site))}
    index_ms = {}
    for name, options in configs.items():
        kernel[name] = timer(_sparse_call(site, options))
        pred = model.sparse_ms(name, w, site.rules, options, site.densities, len(site.names), site.structure["window"])
        index_ms[name] = pred.index_ms
    total = {o: kernel[o] + index_ms.get(o, 0.0) for o in kernel}
    return {"ms": total, "kernel_ms": kernel, "index_ms": index_ms, "length": w.kv_len}


@dataclass
class AutotuneReport:
    rows: list[dict]
    cost_model: CostModel
    cache_path: str

    def __str__(self) -> str:
        lines = [
            f"tuning cache: {self.cache_path}",
            "bucket | sites | dense ms | default ms | best | best ms | x default",
        ]
        for r in self.rows:
            lines.append(
                f"{r['bucket']} | {r['sites']} | {r['ms'][DENSE]:.3f} | {r['ms'].get(DEFAULT_CONFIG, math.nan):.3f} | "
                f"{r['choice']} | {r['ms'][r['choice']]:.3f} | {r['speedup_vs_default']:.2f}"
            )
        return "\n".join(lines)

    __repr__ = __str__


def autotune(
    model: torch.nn.Module,
    example_inputs,
    plan=None,
    *,
    cache: TuningCache | None = None,
    refit: bool = False,
    progress: bool = True,
    timer=median_ms,
) -> AutotuneReport:
    """Tune ahead of time: fit this GPU's cost model (once, or again with ``refit``), then for each
    shape bucket of the model's sites on ``example_inputs`` time dense and each candidate kernel
    config, and store the times; ``sparsecomp.compile`` on this GPU then decides with them."""
    plan = Plan.from_any(plan)
    device = next(model.parameters()).device
    if device.type != "cuda" and timer is median_ms:
        raise RuntimeError(f"autotune times GPU kernels; the model is on {device} (move it to a CUDA device)")
    cache = cache or TuningCache(environment_key(device))
    sites = capture_sites(model, example_inputs, plan)
    head_dims = sorted({s.workload.head_dim for s in sites.values()})
    stored = None if refit else cache.get(COST_MODEL_ENTRY)
    cost = CostModel.from_json(stored) if stored else None
    if cost is None or any(d not in cost.engines.get("sdpa", {}) for d in head_dims):
        cost = fit_cost_model(tuple(head_dims) or (128,), device=device, progress=progress).model
        cache.put(COST_MODEL_ENTRY, cost.to_json())
    rows = []
    for bucket, site in _progress(list(sites.items()), progress, "autotuning sites"):
        configs = candidate_configs(site.rules, plan.block)
        entry = time_site(site, cost, configs, timer)
        entry["choice"] = min(entry["ms"], key=lambda o: (entry["ms"][o], o != DENSE))
        entry["sites"] = site.names
        cache.put(bucket, entry)
        default = entry["ms"].get(DEFAULT_CONFIG, entry["ms"][DENSE])
        speedup = default / entry["ms"][entry["choice"]]
        rows.append({**entry, "bucket": bucket, "sites": len(site.names), "speedup_vs_default": speedup})
    return AutotuneReport(rows, cost, str(cache.path))
