"""Context parallel inside ``sparsecomp.compile(..., context_parallel=True)``: every rank runs the
model on its chunk of the sequence (its ``input_ids`` rows, ``position_ids`` their global
positions), and each prefill site whose mask is proven plain causal becomes this op: the rank's
block index (static rules built alone from positions; block top-k, vertical-slash and
SampleAttention by their per-rank builders, which exchange pooled keys, sampled queries or
scores), the K/V blocks it lists received from their ranks, the block-sparse kernel on them. The
default process group; the sequence splits in equal chunks of whole blocks, rank order =
sequence order. Decode steps after it: ``context_parallel_decode`` below."""

from __future__ import annotations

import collections
import json

import torch
import torch.distributed as dist

from sparsecomp.kernels.prefill.adaptive_index import combine_head_indexes
from sparsecomp.kernels.prefill.block_index import build_block_index

from .context_parallel import (
    ContextChunk,
    block_topk_index_for_chunk,
    context_parallel_attention,
    sample_index_for_chunk,
    vertical_slash_index_for_chunk,
)

# The adaptive rule kinds a rank can build its index rows for: (q, k, chunk, *per-head values,
# **shared parameters, scale=, block_m=, block_n=) -> (index, bytes received).
CHUNK_BUILDERS = {
    "block_topk": block_topk_index_for_chunk,
    "vertical_slash": vertical_slash_index_for_chunk,
    "sample": sample_index_for_chunk,
}

# K/V bytes each site (by name) received on this rank at its last call, for reports and tests.
received_bytes: collections.Counter = collections.Counter()
# Each site's chunk (by name) at this rank's last prefill: the decode steps after it place their keys.
prefill_chunks: dict[str, ContextChunk] = {}


@torch.library.custom_op("sparsecomp::context_parallel_attention", mutates_args=())
def context_parallel_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink: list[int], window: list[int], scale: float,
    block: int, site: str, adaptive: str,
) -> torch.Tensor:  # fmt: skip
    """Causal attention of this rank's rows over the whole sequence's keys, under the heads' local
    rules (sink, window per query head; 0, 0 = every earlier key) and the adaptive groups of
    ``adaptive`` (JSON, ``adaptive_groups_spec``): those heads' index rows built on this input."""
    head_sink, head_window = (torch.tensor(x, dtype=torch.int32, device=q.device) for x in (sink, window))
    chunk = ContextChunk(q.shape[2] * dist.get_world_size(), dist.get_rank(), dist.get_world_size(), block)
    q_pos = torch.arange(chunk.start, chunk.stop, device=q.device)[None]
    k_pos = torch.arange(chunk.length, device=q.device)[None]
    pieces, heads, received_index = [], [], 0
    common = dict(scale=scale, block_m=block, block_n=block)
    for group in json.loads(adaptive):
        index, received = CHUNK_BUILDERS[group["kind"]](q, k, chunk, *group["per_head"], **group["shared"], **common)
        pieces.append(index)
        heads.append(tuple(group["heads"]))
        received_index += received
    static_heads = tuple(h for h in range(q.shape[1]) if not any(h in hs for hs in heads))
    if static_heads:
        pieces.append(build_block_index(q_pos, k_pos, None, head_sink, head_window, causal=True, window=0,
                                        block_m=block, block_n=block, max_blocks=None))  # fmt: skip
        heads.append(static_heads)
    index = pieces[0] if len(pieces) == 1 else combine_head_indexes(pieces, heads, q.shape[1])
    out, received = context_parallel_attention(q, k, v, index, chunk, head_sink=head_sink, head_window=head_window,
                                               scale=scale)  # fmt: skip
    received_bytes[site] = received + received_index
    prefill_chunks[site] = chunk
    return out


@context_parallel_op.register_fake
def _context_parallel_fake(q, k, v, sink, window, scale, block, site, adaptive):
    return q.new_empty(q.shape)


def adaptive_groups_spec(groups, q_heads: int, options) -> str:
    """The adaptive groups of a site's rules (``compiler.lower.adaptive_groups``) as the op's JSON
    argument: kind, heads, per-head values for every query head, shared parameters."""
    from sparsecomp.passes.rewrite import adaptive_call

    spec = []
    for g in groups:
        if g.kind not in CHUNK_BUILDERS:
            raise ValueError(
                f"context parallel builds the index per rank for {sorted(CHUNK_BUILDERS)} among adaptive rules; "
                f"not {g.kind}"
            )
        _, per_head, kwargs = adaptive_call(g, q_heads, scale=1.0, causal=True, window=0, options=options)
        shared = {k: v for k, v in kwargs.items() if k not in ("scale", "causal", "window", "block_m", "block_n")}
        spec.append({"kind": g.kind, "heads": list(g.heads), "per_head": per_head, "shared": shared})
    return json.dumps(spec)


@torch.library.custom_op("sparsecomp::context_parallel_decode", mutates_args=())
def context_parallel_decode_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink: list[int], window: list[int], scale: float, site: str,
    selection: str,
) -> torch.Tensor:  # fmt: skip
    """One decode step after a context-parallel prefill. Every rank's cache holds its prefill chunk
    and then the decoded tokens (each rank appends the same ones: only the last rank's count). Each
    rank attends over its keys under the heads' local rules, and the partial results are merged by
    their log-sum-exp across the ranks (flash-decoding's combine). ``selection`` (JSON, or empty):
    a Double Sparsity or Quest rule, its keys chosen over the whole sequence (``spread_selection``)."""
    chunk = prefill_chunks.get(site)
    if chunk is None or k.shape[2] <= chunk.size:
        raise RuntimeError(f"context parallel decoding of {site}: no context-parallel prefill on this rank came first")
    chosen = spread_selection(q, k, chunk, **json.loads(selection)) if selection else None
    out, lse = partial_decode_attention(q, k, v, chunk, sink, window, scale, chosen)
    outs = [torch.empty_like(out) for _ in range(chunk.world)]
    lses = [torch.empty_like(lse) for _ in range(chunk.world)]
    dist.all_gather(outs, out)
    dist.all_gather(lses, lse)
    return merge_partials(torch.stack(outs), torch.stack(lses)).to(q.dtype)


@context_parallel_decode_op.register_fake
def _context_parallel_decode_fake(q, k, v, sink, window, scale, site, selection):
    return q.new_empty(q.shape)


def spread_selection(q, k, chunk: ContextChunk, *, kind: str, heads: str, ratio: float, count: int,
                     channels=None, page: int = 0) -> torch.Tensor:  # fmt: skip
    """(B, Hq, Nk) bool: which of this rank's keys a selection step keeps, the top of the whole
    sequence's keys (Double Sparsity: by label score on the calibrated ``channels``, one list per
    KV head) or pages of ``page`` keys (Quest: by their bound from the page's min and max of K),
    budget ``count``, else ``ratio`` of them, as on one process. Each rank scores its own keys or
    pages (a chunk holds whole pages), every rank's best ``budget`` scores are gathered, and a rank
    keeps what scores at least the budget-th best of them (ties at that score all kept)."""
    from sparsecomp.kernels.decode.selection import (
        key_labels,
        label_scores_reference,
        page_bounds_reference,
        page_min_max,
        query_channels,
    )
    from sparsecomp.patterns.selection import budget, selection_heads

    b, hq = q.shape[:2]
    n_keys = k.shape[2]
    n_total = chunk.length + n_keys - chunk.size  # the whole sequence's keys
    counts = decode_key_positions(chunk, n_keys, q.device)[1][None].expand(b, -1)
    n_sel = selection_heads(heads, hq, k.shape[1])
    q_last = torch.full((b,), n_keys - 1, dtype=torch.int32, device=q.device)  # the step sees every key it holds
    if kind == "double_sparsity":
        index = torch.tensor(channels, dtype=torch.int64, device=q.device)
        scores = label_scores_reference(query_channels(q, index), key_labels(k, index), q_last, counts, n_sel)
        total = budget(count, ratio, n_total)
    else:  # quest
        if chunk.size % page:
            raise ValueError(f"context parallel Quest needs chunks of whole pages: {chunk.size} keys, pages of {page}")
        pad = -n_keys % page
        ok = torch.nn.functional.pad(counts, (0, pad), value=False)
        kmin, kmax, page_ok = page_min_max(torch.nn.functional.pad(k, (0, 0, 0, pad)), ok, page)
        scores = page_bounds_reference(q, kmin, kmax, q_last, page_ok, page, n_sel)
        total = budget(count, ratio, -(-n_total // page))
    kept = _at_least_the_best_over_ranks(scores, total, chunk)  # (B, Hs, keys or pages)
    if kind == "quest":
        kept = kept.repeat_interleave(page, dim=-1)[..., :n_keys]
    return kept.repeat_interleave(hq // n_sel, dim=1)


def spread_selection_spec(rule, channels) -> str:
    """A Double Sparsity or Quest rule as ``context_parallel_decode``'s ``selection`` (JSON)."""
    spec = {"kind": rule.kind, "heads": rule.heads, "ratio": rule.ratio}
    if rule.kind == "double_sparsity":
        spec.update(count=rule.k, channels=[list(c) for c in channels])
    else:
        spec.update(count=rule.pages, page=rule.page)
    return json.dumps(spec)


def _at_least_the_best_over_ranks(scores: torch.Tensor, total: int, chunk: ContextChunk) -> torch.Tensor:
    """Which of this rank's ``scores`` (..., n) are at least the ``total``-th best of every rank's
    (and finite): the ranks' best ``total`` each, gathered, give the threshold."""
    best = torch.topk(scores, min(total, scores.shape[-1]), dim=-1).values
    best = torch.nn.functional.pad(best, (0, total - best.shape[-1]), value=float("-inf"))
    gathered = [torch.empty_like(best) for _ in range(chunk.world)]
    dist.all_gather(gathered, best.contiguous())
    threshold = torch.topk(torch.cat(gathered, -1), total, dim=-1).values[..., -1:]
    return (scores >= threshold) & (scores > float("-inf"))


def decode_key_positions(chunk: ContextChunk, n_keys: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(global position of each of this rank's ``n_keys`` cached keys, which of them count): the
    chunk's keys, then the decoded tokens, which every rank holds and only the last rank counts."""
    index = torch.arange(n_keys, device=device)
    decoded = index >= chunk.size
    positions = torch.where(decoded, chunk.length + index - chunk.size, chunk.start + index)
    return positions, ~decoded | (chunk.rank == chunk.world - 1)


def partial_decode_attention(q, k, v, chunk: ContextChunk, sink: list[int], window: list[int], scale: float,
                             chosen: torch.Tensor | None = None):  # fmt: skip
    """(out (B, Hq, Nq, D) fp32, log-sum-exp (B, Hq, Nq) fp32) of the query rows over this rank's
    keys (those of ``chosen``, (B, Hq, Nk) bool, where given); a rank with no key counting gives
    lse = -inf (weight 0 in the merge)."""
    k_pos, counts = decode_key_positions(chunk, k.shape[2], q.device)
    q_pos = chunk.length + k.shape[2] - chunk.size - q.shape[2] + torch.arange(q.shape[2], device=q.device)
    group = q.shape[1] // k.shape[1]
    kf, vf = (t.float().repeat_interleave(group, dim=1) for t in (k, v))
    scores = (q.float() @ kf.transpose(-1, -2)) * scale  # (B, Hq, Nq, Nk)
    head_sink = torch.tensor(sink, device=q.device)[:, None, None]
    head_window = torch.tensor(window, device=q.device)[:, None, None]
    distance = q_pos[:, None] - k_pos[None, :]  # (Nq, Nk)
    keep = counts & (distance >= 0) & ((head_window <= 0) | (distance < head_window) | (k_pos < head_sink))
    if chosen is not None:
        keep = keep & chosen[:, :, None, :]
    scores = scores.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.exp(scores - lse[..., None].clamp_min(torch.finfo(torch.float32).min))  # 0 where no key counts
    return weights @ vf, lse


def merge_partials(outs: torch.Tensor, lses: torch.Tensor) -> torch.Tensor:
    """Attention over all ranks' keys from each rank's (out, lse) stacked on dim 0."""
    top = lses.amax(dim=0)
    w = torch.exp(lses - top)  # (R, B, Hq, Nq): each rank's share of the softmax mass
    return (w[..., None] * outs).sum(0) / w.sum(0)[..., None]
