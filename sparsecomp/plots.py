"""Pictures of what a plan keeps: per head, the kept pairs of a site's rules at one length (for
adaptive rules, on given queries and keys), and a layer x head map of a plan's rules and densities.
matplotlib is an optional extra (``pip install 'sparsecomp[plot]'``)."""

from __future__ import annotations

import math

import torch

from sparsecomp.kernels import KernelOptions
from sparsecomp.kernels.prefill.block_sparse_attention import index_pairs, structure_pairs

from .compiler.lower import lower_rules
from .plan import Plan, Rule

_ROW_CHUNK = 1 << 22  # kept-pair elements materialized at once (heads x rows x keys)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("sparsecomp's plots need matplotlib: pip install 'sparsecomp[plot]'") from e
    return plt


def kept_fraction(
    rules: list[Rule], length: int, *, q=None, k=None, kv_heads: int | None = None, head_dim: int = 64,
    block: int = 64, pixels: int = 128,
) -> torch.Tensor:  # fmt: skip
    """(Hq, P, P) fp32, P = min(pixels, length): per query head (one rule each), the share of the
    causal (query, key) pairs in each cell of a P x P grid that the compiled kernel would compute;
    NaN where no pair is causal. Static rules need only the length; adaptive ones (vertical-slash,
    sample, block top-k) read ``q`` (1, Hq, N, D) and ``k`` (1, Hkv, N, D), a site's real inputs."""
    hq = len(rules)
    if q is None or k is None:
        if any(r.adaptive for r in rules):
            kinds = sorted({r.kind for r in rules if r.adaptive})
            raise ValueError(f"adaptive rules ({', '.join(kinds)}) keep what their input decides: give q and k")
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, hq, length, head_dim, generator=g)
        k = torch.randn(1, kv_heads or hq, length, head_dim, generator=g)
    if q.shape[0] != 1 or q.shape[1] != hq or q.shape[2] != length or k.shape[2] != length:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must be (1, {hq} heads, {length}, D)")
    pos = torch.arange(length, device=q.device)[None]
    structure = dict(causal=True, window=0)
    options = KernelOptions(block_m=block, block_n=block)
    with torch.no_grad():
        index, sink, win = lower_rules(
            rules, q, k, pos, pos, None, scale=q.shape[-1] ** -0.5, **structure, options=options
        )
        rows = index_pairs(
            pos, pos, None, *index[:4], index.columns, index.column_count, sink, win, **structure,
            block_m=block, block_n=block,
        )  # fmt: skip
        p = min(pixels, length)
        cell = math.ceil(length / p)
        kept = torch.zeros(hq, p, p, dtype=torch.float64, device=q.device)
        allowed = torch.zeros(1, p, p, dtype=torch.float64, device=q.device)
        step = max(1, _ROW_CHUNK // (hq * length))
        for r0 in range(0, length, step):
            r1 = min(length, r0 + step)
            cells = torch.arange(r0, r1, device=q.device) // cell
            causal = structure_pairs(pos[:, r0:r1], pos, None, **structure)[0]
            for total, pairs in ((kept, rows(r0, r1)[0]), (allowed, causal)):
                padded = torch.nn.functional.pad(pairs.double(), (0, p * cell - length))
                total.index_add_(1, cells, padded.view(*pairs.shape[:2], p, cell).sum(-1))
    return (kept / allowed).where(allowed > 0, float("nan")).float().cpu()


def plot_kept(path, rules: list[Rule], length: int, *, title: str = "", **kwargs) -> None:
    """Write a picture of ``kept_fraction`` (one panel per head; white: not causal) to ``path``."""
    plt = _pyplot()
    fraction = kept_fraction(rules, length, **kwargs)
    hq = fraction.shape[0]
    cols = min(8, hq)
    rows = math.ceil(hq / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols + 0.8, 1.7 * rows + 0.6), squeeze=False)
    for h, ax in enumerate(axes.flat):
        ax.axis("off")
        if h < hq:
            image = ax.imshow(fraction[h].numpy(), cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
            kept = fraction[h].nan_to_num(0).sum() / (~fraction[h].isnan()).sum()
            ax.set_title(f"h{h} {rules[h].kind} {kept:.0%}", fontsize=6)
    fig.colorbar(image, ax=axes, shrink=0.6, label="kept share of the causal pairs")
    fig.suptitle(title or f"kept pairs at N={length} (rows: queries, columns: keys)", fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def rule_map(plan: Plan, sites: list[tuple[str, int, int]], phase: str = "prefill") -> tuple[list, list]:
    """(kinds, densities): per site (name, query heads, KV heads) the rule kind of each query head
    in ``phase``, and its calibrated density where the plan measured one (else None)."""
    measured = plan.info.get("measured", {}) if phase == "prefill" else {}
    kinds, densities = [], []
    for name, hq, hkv in sites:
        kinds.append([r.kind for r in plan.rules_for(name, hq, hkv, phase=phase)])
        heads = measured.get(name, {}).get("heads") or []
        densities.append([h.get("density") for h in heads] if len(heads) == hq else [None] * hq)
    return kinds, densities


def plot_plan(path, plan: Plan, sites: list[tuple[str, int, int]]) -> None:
    """Write a site x head map of a plan's rules (colour: kind; number: calibrated density %) for
    the prefill and, where the plan has decode rules, the decode phase."""
    plt = _pyplot()
    phases = ["prefill"] + (["decode"] if plan.decode_default is not None or plan.decode_sites else [])
    maps = [rule_map(plan, sites, phase) for phase in phases]
    kinds_seen = sorted({kind for kinds, _ in maps for row in kinds for kind in row})
    colour = {kind: i for i, kind in enumerate(kinds_seen)}
    hq = max(s[1] for s in sites)
    fig, axes = plt.subplots(1, len(phases), figsize=(min(18, 2 + 0.35 * hq) * len(phases), 1.5 + 0.3 * len(sites)),
                             squeeze=False)  # fmt: skip
    cmap = plt.get_cmap("tab10", max(1, len(kinds_seen)))
    for ax, phase, (kinds, densities) in zip(axes[0], phases, maps, strict=True):
        grid = torch.full((len(sites), hq), float("nan"))
        for i, row in enumerate(kinds):
            grid[i, : len(row)] = torch.tensor([float(colour[kind]) for kind in row])
        top = len(kinds_seen) - 0.5
        ax.imshow(grid.numpy(), cmap=cmap, vmin=-0.5, vmax=top, aspect="auto", interpolation="nearest")
        for i, row in enumerate(densities):
            for h, d in enumerate(row):
                if d is not None:
                    ax.text(h, i, f"{100 * d:.0f}", ha="center", va="center", fontsize=5, color="white")
        ax.set_yticks(range(len(sites)), [name for name, _, _ in sites], fontsize=5)
        ax.set_xlabel("query head", fontsize=7)
        ax.set_title(f"{phase} rules", fontsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(colour[kind])) for kind in kinds_seen]
    fig.legend(handles, kinds_seen, loc="lower center", ncol=len(kinds_seen), fontsize=7)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
