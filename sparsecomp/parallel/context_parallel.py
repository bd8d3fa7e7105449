"""Context-parallel sparse prefill: the sequence is split into contiguous chunks, one per rank;
each rank computes its own query rows and receives from the others only the K/V blocks its sparse
index lists (for a streaming index: the sink blocks and the window before its chunk, not the whole
sequence), by point-to-point sends over torch.distributed (any backend: gloo on CPU, NCCL on GPUs).

The rank's index is the global index's rows for its query blocks, with global key-block ids (a
static pattern builds it alone: ``build_block_index`` on its own query positions and the global key
positions; block top-k from every rank's pooled key blocks, one all-gather of 1/block_n of K:
``block_topk_index_for_chunk``; vertical-slash from the sequence's last queries, broadcast by the
last rank, each rank scoring its own keys: ``vertical_slash_index_for_chunk``; SampleAttention
from the sampled rows, summed over the ranks, each rank scoring its own keys' column mass:
``sample_index_for_chunk``). While the
others' blocks are in flight, the rank attends to its own (the index restricted and renumbered
onto them, with their global positions: every structure rule reads positions), then to the
received ones side by side, and merges the two by their log-sum-exp (``merge_attention``): the
sends overlap that compute. Blocks move whole: a listed column brings its block."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from sparsecomp.kernels.prefill.adaptive_index import (
    block_topk_index,
    keep_top,
    per_head_values,
    pooled_keys,
    sample_index,
    sampled_rows,
    vertical_slash_lists,
)
from sparsecomp.kernels.prefill.block_index import SparseIndex
from sparsecomp.kernels.prefill.block_sparse_attention import merge_attention, sparse_attention_with_lse


@dataclass(frozen=True)
class ContextChunk:
    """This rank's share of a sequence of ``length`` tokens split over ``world`` ranks: rows
    [start, stop) of Q, K and V, a whole number of query and key blocks."""

    length: int
    rank: int
    world: int
    block: int  # a multiple of the index's block_m and block_n

    def __post_init__(self):
        if self.length % (self.world * self.block):
            raise ValueError(
                f"context parallel: {self.length} tokens do not split into {self.world} chunks of whole "
                f"{self.block}-token blocks; pad the sequence to a multiple of {self.world * self.block}"
            )

    @property
    def size(self) -> int:
        return self.length // self.world

    @property
    def start(self) -> int:
        return self.rank * self.size

    @property
    def stop(self) -> int:
        return self.start + self.size


def index_for_chunk(index: SparseIndex, chunk: ContextChunk) -> SparseIndex:
    """The rows of a whole sequence's ``index`` that ``chunk``'s query blocks read."""
    lo, hi = chunk.start // index.block_m, chunk.stop // index.block_m

    def rows(t):
        return t if t is None or t.shape[2] == 1 else t[:, :, lo:hi]

    return index._replace(
        full_blocks=rows(index.full_blocks), full_count=rows(index.full_count),
        part_blocks=rows(index.part_blocks), part_count=rows(index.part_count),
        columns=rows(index.columns) if index.column_count is None or index.columns.shape[2] > 1 else index.columns,
        column_count=rows(index.column_count),
    )  # fmt: skip


def listed_key_blocks(index: SparseIndex, n_key_blocks: int) -> torch.Tensor:
    """(n_key_blocks,) bool: the key blocks any row or head of ``index`` reads (full and partial
    lists, and the blocks holding its listed columns)."""
    listed = torch.zeros(n_key_blocks + 1, dtype=torch.bool, device=index.full_blocks.device)
    for blocks, count in ((index.full_blocks, index.full_count), (index.part_blocks, index.part_count)):
        used = torch.arange(blocks.shape[-1], device=blocks.device) < count[..., None]
        listed[blocks[used].long()] = True
    if index.columns is not None:
        count = index.column_count
        cols = index.columns.expand(*count.shape, index.columns.shape[-1])
        used = (torch.arange(cols.shape[-1], device=cols.device) < count[..., None]) & (
            cols < n_key_blocks * index.block_n
        )
        listed[(cols[used] // index.block_n).long()] = True
    return listed[:n_key_blocks]


def _renumber_columns(index: SparseIndex, compact_id: torch.Tensor, n_compact_keys: int):
    """``index``'s single key columns mapped onto the compacted blocks; columns of absent blocks
    point past the keys (the kernel skips them)."""
    columns, bn = index.columns, index.block_n
    if columns is None:
        return None
    block = (columns.long() // bn).clamp(max=compact_id.numel() - 1)
    mapped = compact_id[block] * bn + columns.long() % bn
    skipped = (columns.long() >= compact_id.numel() * bn) | (compact_id[block] < 0)
    return torch.where(skipped, n_compact_keys, mapped).to(columns.dtype)


def _restrict(index: SparseIndex, compact_id: torch.Tensor, n_compact_keys: int) -> SparseIndex:
    """``index`` over some of the key blocks only (``compact_id``: global block -> its place among
    them, -1 where absent), renumbered onto them: absent blocks leave the lists (counts shrink)."""
    n_compact = n_compact_keys // index.block_n

    def lists(blocks: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids = compact_id[blocks.long().clamp(0, compact_id.numel() - 1)]
        used = (torch.arange(blocks.shape[-1], device=blocks.device) < count[..., None]) & (ids >= 0)
        first = torch.sort((~used).to(torch.uint8), dim=-1, stable=True).indices  # the kept ones first, in order
        kept = ids.clamp_min(0).gather(-1, first)[..., :n_compact]  # a row lists each block once
        return kept.to(blocks.dtype), used.sum(-1).to(count.dtype)

    full_blocks, full_count = lists(index.full_blocks, index.full_count)
    part_blocks, part_count = lists(index.part_blocks, index.part_count)
    columns = _renumber_columns(index, compact_id, n_compact_keys)
    return index._replace(full_blocks=full_blocks, full_count=full_count, part_blocks=part_blocks,
                          part_count=part_count, columns=columns)  # fmt: skip


def block_rows(blocks: torch.Tensor, block_n: int, device) -> torch.Tensor:
    """The key rows of some key blocks (block ids counted from the rows' first block)."""
    return (blocks[:, None] * block_n + torch.arange(block_n)).flatten().to(device)


class _Exchange:
    """The K/V blocks a rank needs from the others, in flight: every rank learns every rank's needs
    first (one small all-gather), then sends what the others need and posts its receives;
    ``wait()`` gives the received blocks side by side (ascending) once they are all here."""

    def __init__(self, k, v, needed: torch.Tensor, chunk: ContextChunk, block_n: int, group):
        n_kb, local_kb = chunk.length // block_n, chunk.size // block_n
        wants = [torch.empty(n_kb, dtype=torch.uint8, device=k.device) for _ in range(chunk.world)]
        dist.all_gather(wants, needed.to(torch.uint8).to(k.device), group=group)  # on K's device: NCCL too
        wants = [w.cpu() for w in wants]
        mine = range(chunk.rank * local_kb, (chunk.rank + 1) * local_kb)
        self.requests, self.parts, self.received = [], [], 0
        for peer in range(chunk.world):
            if peer == chunk.rank:
                continue
            theirs = range(peer * local_kb, (peer + 1) * local_kb)
            send = torch.tensor([b - mine.start for b in mine if wants[peer][b]], dtype=torch.int64)
            if send.numel():
                rows = block_rows(send, block_n, k.device)
                for t in (k, v):
                    self.requests.append(dist.isend(t.index_select(2, rows).contiguous(), peer, group=group))
            take = [b for b in theirs if needed[b]]
            if take:
                shape = (k.shape[0], k.shape[1], len(take) * block_n, k.shape[3])
                kb, vb = k.new_empty(shape), v.new_empty(shape)
                self.requests += [dist.irecv(kb, peer, group=group), dist.irecv(vb, peer, group=group)]
                self.parts.append((kb, vb))  # peers in rank order: their blocks ascend
                self.received += 2 * kb.numel() * kb.element_size()

    def wait(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        for r in self.requests:
            r.wait()
        if not self.parts:
            return None
        return torch.cat([kb for kb, _ in self.parts], 2), torch.cat([vb for _, vb in self.parts], 2)


def _attend_to_blocks(q, k, v, index: SparseIndex, blocks: torch.Tensor, n_kb: int, q_pos, **rule):
    """This rank's rows over the key blocks ``blocks`` (global ids, ascending) alone, whose K/V are
    ``k``/``v`` side by side: float32 output and log-sum-exp, to merge with the other blocks'."""
    compact_id = torch.full((n_kb,), -1, dtype=torch.int64)
    compact_id[blocks] = torch.arange(blocks.numel())
    k_pos = block_rows(blocks, index.block_n, q.device)[None]
    part = _restrict(index, compact_id.to(index.full_blocks.device), k.shape[2])
    return sparse_attention_with_lse(q, k, v, part, q_pos=q_pos, k_pos=k_pos, **rule)


def context_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: SparseIndex,
    chunk: ContextChunk,
    *,
    head_sink: torch.Tensor | None = None,
    head_window: torch.Tensor | None = None,
    scale: float | None = None,
    causal: bool = True,
    group=None,
) -> tuple[torch.Tensor, int]:
    """This rank's attention output (B, Hq, chunk rows, D) and the K/V bytes it received.

    ``q``, ``k``, ``v``: this rank's rows of the sequence; ``index``: its query blocks' lists with
    global key-block ids (rows ``chunk.start // block_m`` on of the single-process index)."""
    bm, bn = index.block_m, index.block_n
    if chunk.block % bm or chunk.block % bn:
        raise ValueError(f"context parallel: chunk block {chunk.block} is not a multiple of {bm} and {bn}")
    if q.shape[2] != chunk.size or k.shape[2] != chunk.size:
        raise ValueError(f"context parallel: rank {chunk.rank} holds {q.shape[2]} rows; expected {chunk.size}")
    n_kb, local_kb = chunk.length // bn, chunk.size // bn
    needed = listed_key_blocks(index, n_kb).cpu()
    sink = 0 if head_sink is None else int(head_sink.max())
    if sink > chunk.size:
        raise ValueError(f"context parallel: sinks of {sink} keys span more than a rank's {chunk.size} rows")
    if sink > 0:  # the kernel counts sinks from a part's first key: the sink blocks lead the part holding them
        needed[: -(-sink // bn)] = True
    exchange = _Exchange(k, v, needed, chunk, bn, group)  # the others' blocks in flight from here
    own = torch.zeros(n_kb, dtype=torch.bool)
    own[chunk.rank * local_kb : (chunk.rank + 1) * local_kb] = True
    q_pos = torch.arange(chunk.start, chunk.stop, device=q.device)[None]
    outs, lses = [], []

    def attend(k_part, v_part, blocks):  # the part holding key 0 holds the sinks; the other has none
        sinks = head_sink if blocks[0] == 0 or head_sink is None else torch.zeros_like(head_sink)
        rule = dict(head_sink=sinks, head_window=head_window, scale=scale, causal=causal)
        out, lse = _attend_to_blocks(q, k_part, v_part, index, blocks, n_kb, q_pos, **rule)
        outs.append(out)
        lses.append(lse)

    mine = (needed & own).nonzero().flatten()
    if mine.numel():  # this rank's own blocks while the others' arrive
        rows = block_rows(mine - chunk.rank * local_kb, bn, k.device)
        attend(k.index_select(2, rows), v.index_select(2, rows), mine)
    received = exchange.wait()
    if received is not None:
        attend(*received, (needed & ~own).nonzero().flatten())
    if not outs:
        return q.new_zeros(q.shape), exchange.received
    return merge_attention(outs, lses).to(q.dtype), exchange.received


def block_topk_index_for_chunk(
    q, k, chunk: ContextChunk, top_k, *, coverage: float, pool: str, scale: float, block_m: int, block_n: int,
    group=None,
) -> tuple[SparseIndex, int]:  # fmt: skip
    """This rank's rows of the causal block top-k index of the whole sequence, from its own queries
    and every rank's pooled key blocks (gathered); and the bytes it received for them."""
    mine = pooled_keys(k, None, pool, block_n)
    parts = mine if pool == "minmax" else (mine,)
    gathered, received = [], 0
    for part in parts:
        pieces = [torch.empty_like(part) for _ in range(chunk.world)]
        dist.all_gather(pieces, part.contiguous(), group=group)
        gathered.append(torch.cat(pieces, 2))
        received += (chunk.world - 1) * part.numel() * part.element_size()
    pooled = tuple(gathered) if pool == "minmax" else gathered[0]
    q_pos = torch.arange(chunk.start, chunk.stop, device=q.device)[None]
    k_pos = torch.arange(chunk.length, device=q.device)[None]
    index = block_topk_index(
        q, None, q_pos, k_pos, None, top_k, coverage=coverage, pool=pool, scale=scale, causal=True, window=0,
        block_m=block_m, block_n=block_n, pooled=pooled, q_shift=chunk.start,
    )  # fmt: skip
    return index, received


def _row_attention_scores(q_rows, row_pos, k, chunk: ContextChunk, scale: float, group):
    """The last rows' softmax over the whole sequence's keys, scored where the keys are: this rank's
    (B, Hq, R, chunk keys) share, normalized by every rank's row max and sum (two all-reduces)."""
    b, hq, r, d = q_rows.shape
    hkv = k.shape[1]
    logits = (q_rows.float().reshape(b, hkv, (hq // hkv) * r, d) @ k.float().transpose(-1, -2)) * scale
    logits = logits.view(b, hq, r, -1)
    k_pos = torch.arange(chunk.start, chunk.stop, device=k.device)
    logits = logits.masked_fill(k_pos[None, None, None, :] > row_pos[:, None, :, None], float("-inf"))
    row_max = logits.amax(-1)
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    weights = torch.exp(logits - row_max[..., None])  # every row sees key 0: its max is finite
    total = weights.sum(-1)
    dist.all_reduce(total, group=group)
    return weights / total[..., None]


def vertical_slash_index_for_chunk(
    q, k, chunk: ContextChunk, n_vertical, n_slash, *, last_q: int, sink: int, local: int, scale: float,
    block_m: int, block_n: int, mass: float = 1.0, group=None,
) -> tuple[SparseIndex, int]:  # fmt: skip
    """This rank's rows of the causal vertical-slash index of the whole sequence (as
    ``vertical_slash_index`` builds it on one process), and the bytes it received: the last rank's
    ``last_q`` queries, and every rank's column and slash scores of its own keys (float32 per query
    head and key: Hq / (2 Hkv D) of the K/V bytes in bf16)."""
    b, hq, _, d = q.shape
    if last_q > chunk.size:
        raise ValueError(f"context parallel vertical_slash: last_q={last_q} exceeds a rank's {chunk.size} rows")
    last = chunk.world - 1
    q_rows = q[:, :, chunk.size - last_q :].contiguous() if chunk.rank == last else q.new_empty(b, hq, last_q, d)
    dist.broadcast(q_rows, src=last, group=group)
    row_pos = torch.arange(chunk.length - last_q, chunk.length, device=q.device)[None]
    weights = _row_attention_scores(q_rows, row_pos, k, chunk, scale, group)  # (B, Hq, R, chunk keys)
    columns = [torch.empty(b, hq, chunk.size, dtype=torch.float32, device=q.device) for _ in range(chunk.world)]
    dist.all_gather(columns, weights.sum(2).contiguous(), group=group)
    vertical = torch.cat(columns, -1)
    offset = row_pos[0, :, None] - torch.arange(chunk.start, chunk.stop, device=q.device)[None, :]  # (R, keys)
    on_slash = weights.masked_fill(offset < 0, 0.0).reshape(b, hq, -1)
    slash = torch.zeros(b, hq, chunk.length, dtype=torch.float32, device=q.device)
    slash.scatter_add_(-1, offset.clamp_min(0).reshape(1, 1, -1).expand(b, hq, -1), on_slash)
    dist.all_reduce(slash, group=group)
    key_idx = torch.arange(chunk.length, device=q.device)
    cols_kept = keep_top(vertical, (key_idx < sink).expand_as(vertical), per_head_values(n_vertical, hq), mass)
    offsets_kept = keep_top(slash, (key_idx < local).expand_as(slash), per_head_values(n_slash, hq), mass)
    q_pos = torch.arange(chunk.start, chunk.stop, device=q.device)[None]
    index = vertical_slash_lists(
        cols_kept, offsets_kept, q_pos, key_idx[None], None, max(per_head_values(n_vertical, hq)) + sink, causal=True,
        window=0, block_m=block_m, block_n=block_n, q_shift=chunk.start,
    )  # fmt: skip
    scores = b * hq * 4 * ((chunk.world - 1) * chunk.size + chunk.length)  # the gather and the all-reduce
    received = (q_rows.numel() * q_rows.element_size() if chunk.rank != last else 0) + scores
    return index, received


_SCORE_ELEMENTS = 1 << 26  # float32 logits a chunk of sampled rows holds at once (256 MiB)


def _column_mass_of_chunk(q_rows, row_pos, k, chunk: ContextChunk, scale: float, group) -> torch.Tensor:
    """(B, Hq, chunk keys) float32: each of this rank's keys' share of the softmax of every row of
    ``q_rows`` (B, Hq, R, D; global positions ``row_pos`` (R,)) over the whole sequence's keys it
    sees (causal), summed over the rows: SampleAttention's column mass. Row max and sum over all
    ranks by two all-reduces; in chunks of rows (three passes over their logits)."""
    b, hq, r, d = q_rows.shape
    hkv, size = k.shape[1], k.shape[2]
    k_pos = torch.arange(chunk.start, chunk.stop, device=k.device)
    step = max(1, _SCORE_ELEMENTS // max(1, b * hq * size))
    parts = [slice(i, min(r, i + step)) for i in range(0, r, step)]
    kf = k.float().transpose(-1, -2)

    def logits(part):
        rows = q_rows[:, :, part].float()
        n = rows.shape[2]
        s = (rows.reshape(b, hkv, (hq // hkv) * n, d) @ kf).view(b, hq, n, size) * scale
        return s.masked_fill(k_pos[None, None, None, :] > row_pos[part][None, None, :, None], float("-inf"))

    row_max = torch.cat([logits(p).amax(-1) for p in parts], -1)  # (B, Hq, R)
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)  # every row sees key 0: finite
    total = torch.cat([torch.exp(logits(p) - row_max[:, :, p, None]).sum(-1) for p in parts], -1)
    dist.all_reduce(total, group=group)
    mass = torch.zeros(b, hq, size, dtype=torch.float32, device=k.device)
    for p in parts:
        mass += (torch.exp(logits(p) - row_max[:, :, p, None]) / total[:, :, p, None]).sum(2)
    return mass


def sample_index_for_chunk(
    q, k, chunk: ContextChunk, alpha, *, window_ratio: float, sample_ratio: float, scale: float, block_m: int,
    block_n: int, group=None,
) -> tuple[SparseIndex, int]:  # fmt: skip
    """This rank's rows of the causal SampleAttention index of the whole sequence (as
    ``sample_index`` builds it on one process), and the bytes it received: the sampled query rows
    (each rank fills in its own, summed over the ranks) and every rank's column mass of its own
    keys (float32 per query head and key)."""
    b, hq, _, d = q.shape
    rows = sampled_rows(chunk.length, sample_ratio, q.device)
    mine = (rows >= chunk.start) & (rows < chunk.stop)
    q_rows = torch.zeros(b, hq, rows.numel(), d, dtype=torch.float32, device=q.device)  # exact: one term each
    q_rows[:, :, mine] = q[:, :, rows[mine] - chunk.start].float()
    dist.all_reduce(q_rows, group=group)
    mass = _column_mass_of_chunk(q_rows.to(q.dtype), rows, k, chunk, scale, group)
    columns = [torch.empty_like(mass) for _ in range(chunk.world)]
    dist.all_gather(columns, mass.contiguous(), group=group)
    pos = torch.arange(chunk.length, device=q.device)[None]
    whole = sample_index(
        q[:, :, :1].expand(b, hq, chunk.length, d), k[:, :, :1].expand(b, k.shape[1], chunk.length, d), pos, pos,
        None, alpha, window_ratio=window_ratio, sample_ratio=sample_ratio, scale=scale, causal=True, window=0,
        block_m=block_m, block_n=block_n, score=torch.cat(columns, -1),
    )  # fmt: skip
    received = int((~mine).sum()) * b * hq * d * q.element_size() + b * hq * 4 * (chunk.length - chunk.size)
    return index_for_chunk(whole, chunk), received
