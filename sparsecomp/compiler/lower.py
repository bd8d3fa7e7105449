"""Lowering a site's per-head rules to the sparse index, eagerly (calibration and autotune run it on
captured tensors; the graph rewrite, ``passes.rewrite.rewrite_site``, emits the same builders as
graph nodes, sharing the static index between sites)."""

from __future__ import annotations

import torch

from sparsecomp.kernels import KernelOptions, SparseIndex, build_block_index
from sparsecomp.kernels.prefill.adaptive_index import combine_head_indexes
from sparsecomp.passes.rewrite import AdaptiveGroup, adaptive_call

from ..patterns import PATTERNS
from ..plan import Rule


def adaptive_groups(rules: list[Rule]) -> tuple[AdaptiveGroup, ...]:
    """Heads with adaptive rules, grouped by kind and shared parameters (one index builder each)."""
    groups: dict[tuple, list[tuple[int, Rule]]] = {}
    for h, rule in enumerate(rules):
        if rule.adaptive:
            per_head = PATTERNS[rule.kind].per_head
            shared = tuple((k, v) for k, v in rule.params if k not in per_head)
            groups.setdefault((rule.kind, shared), []).append((h, rule))
    return tuple(
        AdaptiveGroup(
            kind=kind,
            builder=PATTERNS[kind].builder,
            heads=tuple(h for h, _ in members),
            shared=shared,
            per_head=tuple((name, tuple(getattr(r, name) for _, r in members)) for name in PATTERNS[kind].per_head),
        )
        for (kind, shared), members in groups.items()
    )


def lower_rules(
    rules: list[Rule], q, k, q_pos, k_pos, key_ok, *, scale: float, causal: bool, window: int, options: KernelOptions
) -> tuple[SparseIndex, torch.Tensor, torch.Tensor]:
    """(index, head_sink, head_window) of one rule per query head, as the compiled model builds them
    on these inputs: static heads from their local rules, adaptive heads from their builders."""
    hq, dev = q.shape[1], q.device
    sink, win = zip(*(r.head_params(k.shape[2]) for r in rules), strict=True)
    head_sink, head_window = (torch.tensor(v, dtype=torch.int32, device=dev) for v in (sink, win))
    static_heads = tuple(h for h in range(hq) if not rules[h].adaptive)
    uniform = len({(sink[h], win[h]) for h in static_heads}) <= 1  # one shared index head (stride 0)
    first = static_heads[0] if static_heads else 0
    static = build_block_index(
        q_pos, k_pos, key_ok, head_sink[first : first + 1] if uniform else head_sink,
        head_window[first : first + 1] if uniform else head_window, causal=causal, window=window,
        block_m=options.block_m, block_n=options.block_n, max_blocks=None,
    ) if static_heads else None  # fmt: skip
    groups = adaptive_groups(rules)
    if not groups:
        return static, head_sink, head_window
    pieces, heads = [], []
    for g in groups:
        builder, per_head, kwargs = adaptive_call(g, hq, scale=scale, causal=causal, window=window, options=options)
        pieces.append(builder(q, k, q_pos, k_pos, key_ok, *per_head, **kwargs))
        heads.append(g.heads)
    if static_heads:
        pieces.append(static)
        heads.append(static_heads)
    if len(pieces) == 1 and heads[0] == tuple(range(hq)):
        return pieces[0], head_sink, head_window
    return combine_head_indexes(pieces, heads, hq), head_sink, head_window
