"""Rewriting a matched site into: positions → block index builder → sparse_attention_call (the op).

The new nodes read only O(N) position and padding vectors; once the site's output is replaced,
dead-code elimination removes the old attention, the repeated K/V and the N x N mask.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx

import sparsecomp.kernels.decode.sparse_decode  # noqa: F401  (registers torch.ops.sparsecomp.sparse_decode)
from sparsecomp.kernels import (
    KernelOptions,
    block_index_bound,
    build_block_index,
    index_positions,
    sparse_attention_call,
)
from sparsecomp.kernels.decode.selection import merge_selections, window_tokens
from sparsecomp.kernels.prefill.adaptive_index import combine_head_indexes
from sparsecomp.kernels.prefill.block_index import last_valid_key

from .match import default_scale
from .site import AttentionSite, meta_val


def trailing_positions(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Positions of queries that follow a KV cache: ``Nk - Nq + arange(Nq)`` as a (1, Nq) tensor."""
    n_q, n_k = q.shape[2], k.shape[2]
    return (torch.arange(n_q, device=q.device) + (n_k - n_q)).unsqueeze(0)


def positions_after_valid_keys(q: torch.Tensor, key_ok: torch.Tensor) -> torch.Tensor:
    """(B', Nq) positions of queries that end at each row's last existing key. A static cache marks
    its rows not written yet as missing keys: its step's query sits there, not at the cache's end
    (the same keys for a causal rule, but a window counts from the real position)."""
    n_q = q.shape[2]
    return last_valid_key(key_ok) - (n_q - 1) + torch.arange(n_q, device=key_ok.device)


def key_prefix(key_ok: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The padding mask's first Nk columns as (B, Nk): what the original mask read (under dynamic
    shapes the mask and the keys have lengths of their own symbols, equal at run time)."""
    if key_ok.dim() == 4:  # a (B, 1, 1, Nk) mask of one query row (see backend._structure)
        key_ok = key_ok[:, 0, 0, :]
    torch._check(key_ok.shape[-1] >= k.shape[2], lambda: "the padding mask is shorter than the keys")
    return key_ok[:, : k.shape[2]]


def _query_positions(graph, site: AttentionSite):
    s = site.structure
    if s.q_at_end and s.key_ok is not None:
        return graph.call_function(positions_after_valid_keys, (site.q, _key_ok(graph, site)))
    if s.q_at_end:
        return graph.call_function(trailing_positions, (site.q, site.k))
    return _positions(graph, s.q_source, site.q, 2, s.q_offset)


def _key_ok(graph, site: AttentionSite):
    key_ok = site.structure.key_ok  # a bool (B, Nk) tensor: the mask pass only accepts those
    return None if key_ok is None else graph.call_function(key_prefix, (key_ok, site.k))


def _positions(graph, source, like, dim, offset):
    if source is None:
        return graph.call_function(index_positions, (like, dim, offset))
    return source if offset == 0 else graph.call_function(operator.add, (source, offset))


def head_values(values: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """Per-head rule parameters as an int32 tensor on ``like``'s device (a constant of the graph)."""
    return torch.tensor(values, dtype=torch.int32, device=like.device)


@dataclass(frozen=True)
class AdaptiveGroup:
    """Query heads of a site that share an adaptive rule kind and its shared parameters."""

    kind: str
    builder: Callable  # the pattern's index builder (sparsecomp.patterns), run on the site's Q and K
    heads: tuple[int, ...]
    shared: tuple[tuple[str, object], ...]  # (name, value) of the shared parameters
    per_head: tuple[tuple[str, tuple], ...]  # (name, one value per head of ``heads``)


def adaptive_call(group: AdaptiveGroup, q_heads: int, *, scale: float, causal: bool, window: int, options):
    """(builder, per-head value lists, keyword arguments) of a group's index builder over all query
    heads (its estimate needs whole KV groups); the group's heads are taken from it when heads are
    combined. Heads outside the group borrow the first one's budget."""
    builder, values = group.builder, dict(group.per_head)
    per_head = []
    for name, _ in group.per_head:
        by_head = dict(zip(group.heads, values[name], strict=True))
        per_head.append([by_head.get(h, values[name][0]) for h in range(q_heads)])
    kwargs = dict(group.shared) | dict(
        scale=scale, causal=causal, window=window, block_m=options.block_m, block_n=options.block_n
    )
    return builder, per_head, kwargs


def _adaptive_index(graph, site: AttentionSite, group: AdaptiveGroup, q_pos, k_pos, key_ok, options) -> fx.Node:
    s = site.structure
    builder, per_head, kwargs = adaptive_call(
        group, site.shape["q_heads"], scale=float(default_scale(site)), causal=s.causal, window=s.window,
        options=options,
    )  # fmt: skip
    return graph.call_function(builder, (site.q, site.k, q_pos, k_pos, key_ok, *per_head), kwargs)


def rewrite_site(
    gm: fx.GraphModule,
    site: AttentionSite,
    head_sink: list[int],
    head_window: list[int],
    options: KernelOptions,
    shared: dict,
    adaptive: tuple[AdaptiveGroup, ...] = (),
) -> fx.Node:
    """Replace the site's output with the sparse op. ``shared`` caches index nodes across sites
    that have the same structure and static rules (every layer of a model usually does); heads with
    adaptive rules get their index from this site's own Q and K (``adaptive``), combined with the
    static heads' index."""
    graph, s = gm.graph, site.structure
    lengths = str((site.shape["q_len"], site.shape["kv_len"]))  # sizes may be SymInts: compare their text
    taken = {h for g in adaptive for h in g.heads}
    static_heads = tuple(h for h in range(len(head_sink)) if h not in taken)
    # The static index only serves the static heads: its sharing and list bound follow their rules.
    static_sink = [head_sink[h] for h in static_heads or (0,)]
    static_window = [head_window[h] for h in static_heads or (0,)]
    key = (
        lengths,
        s.q_source,
        s.k_source,
        s.key_ok,
        s.q_offset,
        s.q_at_end,
        s.causal,
        s.window,
        tuple(head_sink),
        tuple(head_window),
        static_heads,
        options,
    )
    with graph.inserting_before(site.output):
        if key not in shared:
            q_pos = _query_positions(graph, site)
            k_pos = _positions(graph, s.k_source, site.k, 2, 0)
            key_ok = _key_ok(graph, site)
            sink = graph.call_function(head_values, (tuple(head_sink), site.q))
            window = graph.call_function(head_values, (tuple(head_window), site.q))
            # Heads with one shared rule share one index (head dimension 1, read with stride 0).
            uniform = len(set(zip(static_sink, static_window, strict=True))) == 1
            index_sink = graph.call_function(head_values, (tuple(static_sink[:1]), site.q)) if uniform else sink
            index_window = graph.call_function(head_values, (tuple(static_window[:1]), site.q)) if uniform else window
            bound = block_index_bound(
                static_sink,
                static_window,
                causal=s.causal,
                window=s.window,
                block_m=options.block_m,
                block_n=options.block_n,
                positions_are_indices=s.positions_are_indices,
            )
            index = graph.call_function(
                build_block_index,
                (q_pos, k_pos, key_ok, index_sink, index_window),
                dict(
                    causal=s.causal,
                    window=s.window,
                    block_m=options.block_m,
                    block_n=options.block_n,
                    max_blocks=bound,
                ),
            )
            shared[key] = (q_pos, k_pos, key_ok, sink, window, index)
        q_pos, k_pos, key_ok, sink, window, index = shared[key]
        if adaptive:
            hq = site.shape["q_heads"]
            pieces = [_adaptive_index(graph, site, g, q_pos, k_pos, key_ok, options) for g in adaptive]
            heads = [g.heads for g in adaptive]
            if static_heads:
                pieces.append(index)
                heads.append(static_heads)
            index = graph.call_function(combine_head_indexes, (pieces, heads, hq))
        # The index is one node (a SparseIndex at run time, its block sizes inside). The options are
        # made by a node too: FX's generated code prints a dataclass constant without importing its class.
        if ("options", options) not in shared:
            shared["options", options] = graph.call_function(KernelOptions, (), dataclasses.asdict(options))
        structure = dict(
            q_pos=q_pos, k_pos=k_pos, key_ok=key_ok, head_sink=sink, head_window=window,
            scale=float(default_scale(site)), causal=s.causal, window=s.window, softcap=float(site.softcap),
        )  # fmt: skip
        out = graph.call_function(
            sparse_attention_call, (site.q, site.k, site.v, index), dict(structure, options=shared["options", options])
        )
        old = meta_val(site.output)
        if old is not None and old.dtype != site.dtype:
            out = graph.call_method("to", (out, old.dtype))
    site.output.replace_all_uses_with(out)
    return out


def last_query_index(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(B,) int32: the cache index of the last query row of a decode step, Nk - 1 (the structure
    proved the queries sit at the end; a static cache's unwritten rows are masked by its key mask)."""
    return torch.full((q.shape[0],), k.shape[2] - 1, dtype=torch.int32, device=q.device)


def channel_values(channels: tuple[tuple[int, ...], ...], like: torch.Tensor) -> torch.Tensor:
    """(Hkv, C) int64 calibrated channels on ``like``'s device (a constant of the graph)."""
    return torch.tensor(channels, dtype=torch.int64, device=like.device)


@dataclass
class HeadSelection:
    """How some selection heads (``heads``) of a decode site choose their tokens: by a selection
    ``pattern`` (its params, calibrated channels, and the nodes of its state kept beside the cache,
    or None: summarized from all of K here), or, with no pattern, a local rule (``sink``, ``window``)."""

    heads: tuple[int, ...]
    pattern: object = None
    params: dict = dataclasses.field(default_factory=dict)
    channels: tuple | None = None
    state: list | None = None
    sink: int = 0
    window: int = 0


def _selected_tokens(graph, site: AttentionSite, part: HeadSelection, n_sel: int, key_ok, q_last) -> fx.Node:
    """(B, n_sel, S) tokens of every selection head by one part's rule (the caller keeps its heads')."""
    if part.pattern is None:
        return graph.call_function(window_tokens, (key_ok, site.k, n_sel, part.sink, part.window))
    ch = None if part.channels is None else graph.call_function(channel_values, (part.channels, site.q))
    state = part.state
    if state is None:
        state = graph.call_function(part.pattern.summarize, (site.k, key_ok, ch), part.params)
    return graph.call_function(part.pattern.select_from, (site.q, state, site.k, key_ok, q_last, ch), part.params)


def _observe_step(graph, site: AttentionSite, part: HeadSelection, tokens: fx.Node, key_ok, q_last) -> None:
    """A state that learns from the step's attention (H2O) is rewritten in place from the tokens
    the step attends to."""
    if part.pattern is None or part.pattern.observe_step is None or part.state is None:
        return
    args = (site.q, part.state, site.k, tokens, key_ok, q_last, float(default_scale(site)))
    fresh = graph.call_function(part.pattern.observe_step, args, part.params)
    for i, buffer in enumerate(part.state):
        graph.call_method("copy_", (buffer, graph.call_function(operator.getitem, (fresh, i))))


def rewrite_decode_site(gm: fx.GraphModule, site: AttentionSite, parts: list[HeadSelection], n_sel: int) -> fx.Node:
    """Replace a decode step's attention (queries after the KV cache) by selection + sparse_decode:
    each of ``n_sel`` selection heads attends to the tokens its part of ``parts`` chooses in the
    graph (parts of several rules: each rule's list for every head, then each head's own picked)."""
    graph = gm.graph
    with graph.inserting_before(site.output):
        q_last = graph.call_function(last_query_index, (site.q, site.k))
        key_ok = _key_ok(graph, site)
        lists = [_selected_tokens(graph, site, part, n_sel, key_ok, q_last) for part in parts]
        for part, listed in zip(parts, lists, strict=True):
            _observe_step(graph, site, part, listed, key_ok, q_last)
        tokens = lists[0]
        if len(parts) > 1:
            owner = tuple(next(i for i, p in enumerate(parts) if hs in p.heads) for hs in range(n_sel))
            tokens = graph.call_function(merge_selections, (lists, owner))
        out = graph.call_function(
            torch.ops.sparsecomp.sparse_decode.default,
            (site.q, site.k, site.v, tokens, q_last, key_ok, float(default_scale(site)), float(site.softcap)),
        )
        old = meta_val(site.output)
        if old is not None and old.dtype != site.dtype:
            out = graph.call_method("to", (out, old.dtype))
    site.output.replace_all_uses_with(out)
    return out


def is_plain_causal(site: AttentionSite) -> bool:
    """The site computes causal attention over a whole sequence: no padding, window, offset, softcap."""
    s, sh = site.structure, site.shape
    return (
        s.causal
        and not s.window
        and s.key_ok is None
        and s.positions_are_indices
        and not s.q_at_end
        and s.q_offset == 0
        and str(sh["q_len"]) == str(sh["kv_len"])
        and not site.softcap
    )


def rewrite_dense_causal(gm: fx.GraphModule, site: AttentionSite) -> fx.Node:
    """Replace a plain causal site (``is_plain_causal``) by SDPA with ``is_causal=True`` and no mask:
    the fused causal kernels (cuDNN / FlashAttention on the GPU) that a materialized mask rules out."""
    graph = gm.graph
    with graph.inserting_before(site.output):
        out = graph.call_function(
            torch.nn.functional.scaled_dot_product_attention,
            (site.q, site.k, site.v),
            dict(is_causal=True, scale=float(default_scale(site)), enable_gqa=site.kv_groups > 1),
        )
        old = meta_val(site.output)
        if old is not None and old.dtype != site.dtype:
            out = graph.call_method("to", (out, old.dtype))
    site.output.replace_all_uses_with(out)
    return out


def observe_site(gm: fx.GraphModule, site: AttentionSite, observer) -> fx.Node:
    """Route the site's (kept, exact) output through ``observer(out, q, k, v, q_pos, k_pos, key_ok,
    site=, scale=, causal=, window=)``, which sees the real tensors at run time and returns ``out``
    (calibration; the graph must run eagerly: Python calls inside it stay as they are)."""
    graph, s = gm.graph, site.structure
    with graph.inserting_before(site.output.next):  # new nodes in creation order, after the output
        q_pos = _query_positions(graph, site)
        k_pos = _positions(graph, s.k_source, site.k, 2, 0)
        kwargs = dict(site=site.name, scale=float(default_scale(site)), causal=s.causal, window=s.window)
        node = graph.call_function(
            observer, (site.output, site.q, site.k, site.v, q_pos, k_pos, _key_ok(graph, site)), kwargs
        )
    site.output.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)
    return node
