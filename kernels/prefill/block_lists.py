"""Block lists from block selections: the kernel's full / part lists (see ``block_index.py``).

Notation as in ``block_index.py`` (B, Hq, nQB, nKB, BM, BN). Whether a block pair (i, j) holds some
pair the structure keeps (``some``) or only such pairs (``every``) follows from per-block bounds:
query block i's positions [q_lo, q_hi]; key block j's valid positions [k_lo, k_hi] (k_lo > k_hi when
it has none) and whether all of its BN keys exist and are valid (``k_all``):

    some  = k_lo <= k_hi  [and k_lo <= q_hi if causal]  [and q_lo - k_hi < window if window > 0]
    every = k_all         [and k_hi <= q_lo if causal]  [and q_hi - k_lo < window if window > 0]

A selected pair goes to the full list when ``some and every``, to the part list (element mask)
when ``some and not every``, nowhere otherwise. Lists are ascending, (B, Hq, nQB, nKB) int32 with
zeros past the count, counts (B, Hq, nQB) int32.

``diagonal_block_lists`` selects by block diagonal: pair (i, j) is selected when
``rel_set[b, h, j - i + base]`` is nonzero (vertical-slash's kept offsets). On CUDA a Triton kernel
walks each query block's key blocks in chunks and appends in place (no nQB x nKB matrix in memory:
at 128K tokens and 32 heads that matrix is 33M entries, built, masked and compacted twice); the
reference builds the selection matrix and compacts it.

``diagonal_column_lists`` gives each query block i the kept single columns ``ids`` (B, Hq, W),
ascending, Nk in unused slots: ids[w] as it is, or Nk (skipped by the attention kernel) where the
column's key block j lies on a selected diagonal (``rel_set[b, h, j - i + base]``: already computed
as a block); the count is the number of ids below the block's last row's key index + 1. A Triton
kernel on CUDA (one program per query block and head: the (B, Hq, nQB, W) output written once);
the reference computes the same with broadcast tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .block_index import _block_bounds
from .block_sparse_attention import _batch_stride


def block_limits(q_pos, k_pos, key_ok, block_m: int, block_n: int):
    """(q_lo, q_hi) per query block (B', nQB); (k_lo, k_hi) per key block (B', nKB); k_all (B'', nKB)."""
    n_k = k_pos.shape[-1]
    n_qb, n_kb = -(-q_pos.shape[-1] // block_m), -(-n_k // block_n)
    q_lo, q_hi = _block_bounds(q_pos, None, block_m, n_qb)
    k_lo, k_hi = _block_bounds(k_pos, key_ok, block_n, n_kb)
    key_idx = torch.arange(n_kb * block_n, device=k_pos.device)
    exists = key_idx < n_k
    if key_ok is not None:
        exists = exists & key_ok[..., key_idx.clamp_max(n_k - 1)]
    k_all = exists.view(-1, n_kb, block_n).all(-1)
    return q_lo, q_hi, k_lo, k_hi, k_all


def pair_rule(q_lo, q_hi, k_lo, k_hi, k_all, *, causal: bool, window: int):
    """(some, every) of block pairs, broadcasting the bounds (see the module notes)."""
    some, every = k_lo <= k_hi, k_all
    if causal:
        some, every = some & (k_lo <= q_hi), every & (k_hi <= q_lo)
    if window > 0:
        some, every = some & (q_lo - k_hi < window), every & (q_hi - k_lo < window)
    return some, every


def structure_blocks(limits, *, causal: bool, window: int):
    """(some, every) of every block pair, (B', 1, nQB, nKB), from ``block_limits``."""
    q_lo, q_hi, k_lo, k_hi, k_all = limits
    q_lo, q_hi = q_lo[:, None, :, None], q_hi[:, None, :, None]
    k_lo, k_hi, k_all = k_lo[:, None, None, :], k_hi[:, None, None, :], k_all[:, None, None, :]
    return pair_rule(q_lo, q_hi, k_lo, k_hi, k_all, causal=causal, window=window)


def compact(keep: torch.Tensor, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids of the True entries along the last dim, ascending, first ``length`` slots; and their count.
    A cumulative sum places each kept id (cheaper than a sort over nKB)."""
    n = keep.shape[-1]
    length = n if length is None else length
    count = keep.sum(-1, dtype=torch.int32)
    slot = torch.cumsum(keep, -1, dtype=torch.int32) - 1
    slot = torch.where(keep & (slot < length), slot, length)  # the extra slot collects the rest
    ids = torch.arange(n, device=keep.device, dtype=torch.int32).expand(keep.shape)
    out = torch.zeros(*keep.shape[:-1], length + 1, dtype=torch.int32, device=keep.device)
    return out.scatter_(-1, slot.long(), ids)[..., :length].contiguous(), count


# fmt: off
@triton.jit
def _diagonal_lists_kernel(
    RelSet, QLo, QHi, KLo, KHi, KAll, Full, FullCount, Part, PartCount,
    stride_rb, stride_rh, stride_qb, stride_kb, stride_ab,
    n_heads, n_qb, n_kb, base, window,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, CHUNK: tl.constexpr,
):
    """One program per (query block, batch x head): its selected key blocks, CHUNK at a time, each
    appended to the full or part list at the running count (a prefix sum inside the chunk)."""
    i = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    q_lo = tl.load(QLo + b * stride_qb + i)
    q_hi = tl.load(QHi + b * stride_qb + i)
    rel_base = b * stride_rb + h * stride_rh + base - i
    out_base = (pid_bh * n_qb + i).to(tl.int64) * n_kb
    n_full = tl.full((), 0, tl.int32)
    n_part = tl.full((), 0, tl.int32)
    for j0 in range(0, n_kb, CHUNK):
        j = j0 + tl.arange(0, CHUNK)
        in_range = j < n_kb
        selected = tl.load(RelSet + rel_base + j, mask=in_range, other=0) != 0
        k_lo = tl.load(KLo + b * stride_kb + j, mask=in_range, other=0)
        k_hi = tl.load(KHi + b * stride_kb + j, mask=in_range, other=-1)
        some = k_lo <= k_hi
        every = tl.load(KAll + b * stride_ab + j, mask=in_range, other=0) != 0
        if CAUSAL:
            some = some & (k_lo <= q_hi)
            every = every & (k_hi <= q_lo)
        if HAS_WINDOW:
            some = some & (q_lo - k_hi < window)
            every = every & (q_hi - k_lo < window)
        keep = selected & some & in_range
        full = (keep & every).to(tl.int32)
        part = (keep & ~every).to(tl.int32)
        tl.store(Full + out_base + n_full + tl.cumsum(full, 0) - 1, j, mask=full != 0)
        tl.store(Part + out_base + n_part + tl.cumsum(part, 0) - 1, j, mask=part != 0)
        n_full += tl.sum(full, 0)
        n_part += tl.sum(part, 0)
    tl.store(FullCount + pid_bh * n_qb + i, n_full)
    tl.store(PartCount + pid_bh * n_qb + i, n_part)
# fmt: on


def diagonal_lists_triton(rel_set, q_lo, q_hi, k_lo, k_hi, k_all, base, causal, window, *, chunk=256):
    b, hq = rel_set.shape[:2]
    n_qb, n_kb = q_lo.shape[-1], k_lo.shape[-1]
    rel_set = rel_set.contiguous()
    q_lo, q_hi, k_lo, k_hi = (t.contiguous() for t in (q_lo, q_hi, k_lo, k_hi))
    k_all = k_all.to(torch.int8).contiguous()
    full, part = (torch.zeros(b, hq, n_qb, n_kb, dtype=torch.int32, device=rel_set.device) for _ in range(2))
    full_count, part_count = (torch.empty(b, hq, n_qb, dtype=torch.int32, device=rel_set.device) for _ in range(2))
    _diagonal_lists_kernel[(n_qb, b * hq)](
        rel_set, q_lo, q_hi, k_lo, k_hi, k_all, full, full_count, part, part_count,
        rel_set.stride(0), rel_set.stride(1), _batch_stride(q_lo), _batch_stride(k_lo), _batch_stride(k_all),
        hq, n_qb, n_kb, base, window,
        CAUSAL=causal, HAS_WINDOW=window > 0, CHUNK=chunk,
    )  # fmt: skip
    return full, full_count, part, part_count


def diagonal_lists_reference(rel_set, q_lo, q_hi, k_lo, k_hi, k_all, base, causal, window):
    n_qb, n_kb = q_lo.shape[-1], k_lo.shape[-1]
    rel_of = torch.arange(n_kb, device=rel_set.device)[None, :] - torch.arange(n_qb, device=rel_set.device)[:, None]
    selected = rel_set[:, :, rel_of + base] != 0  # (B, Hq, nQB, nKB)
    some, every = structure_blocks((q_lo, q_hi, k_lo, k_hi, k_all), causal=causal, window=window)
    keep = selected & some
    return (*compact(keep & every), *compact(keep & ~every))


@torch.library.custom_op("sparsecomp::diagonal_block_lists", mutates_args=())
def diagonal_block_lists(
    rel_set: torch.Tensor,
    q_lo: torch.Tensor,
    q_hi: torch.Tensor,
    k_lo: torch.Tensor,
    k_hi: torch.Tensor,
    k_all: torch.Tensor,
    base: int,
    causal: bool,
    window: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(full_blocks, full_count, part_blocks, part_count) of the pairs on the selected block
    diagonals (see the module notes): the Triton kernel on CUDA, the reference elsewhere."""
    if rel_set.is_cuda:
        return diagonal_lists_triton(rel_set, q_lo, q_hi, k_lo, k_hi, k_all, base, causal, window)
    return diagonal_lists_reference(rel_set, q_lo, q_hi, k_lo, k_hi, k_all, base, causal, window)


@diagonal_block_lists.register_fake
def _diagonal_block_lists_fake(rel_set, q_lo, q_hi, k_lo, k_hi, k_all, base, causal, window):
    b, hq = rel_set.shape[:2]
    n_qb, n_kb = q_lo.shape[-1], k_lo.shape[-1]
    lists = [rel_set.new_empty(b, hq, n_qb, n_kb, dtype=torch.int32) for _ in range(2)]
    counts = [rel_set.new_empty(b, hq, n_qb, dtype=torch.int32) for _ in range(2)]
    return lists[0], counts[0], lists[1], counts[1]


# fmt: off
@triton.jit
def _column_lists_kernel(
    Ids, RelSet, Columns, Count,
    stride_ib, stride_ih, stride_rb, stride_rh,
    n_heads, n_qb, n_kb, width, n_k, shift, base,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):
    """One program per (query block, batch x head): its copy of the head's kept columns, those on a
    selected block diagonal replaced by Nk, and how many lie below its rows' end."""
    i = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    row_end = tl.minimum((i + 1) * BLOCK_M + shift, n_k)
    rel_base = b * stride_rb + h * stride_rh + base - i
    out_base = (pid_bh * n_qb + i).to(tl.int64) * width
    count = tl.full((), 0, tl.int32)
    for w0 in range(0, width, CHUNK):
        w = w0 + tl.arange(0, CHUNK)
        in_range = w < width
        ids = tl.load(Ids + b * stride_ib + h * stride_ih + w, mask=in_range, other=n_k)
        key_block = tl.minimum(ids // BLOCK_N, n_kb - 1)
        on_diagonal = tl.load(RelSet + rel_base + key_block, mask=in_range, other=0) != 0
        tl.store(Columns + out_base + w, tl.where(on_diagonal, n_k, ids), mask=in_range)
        count += tl.sum((ids < row_end).to(tl.int32), 0)
    tl.store(Count + pid_bh * n_qb + i, count)
# fmt: on


def column_lists_triton(ids, rel_set, base, n_qb, n_k, shift, block_m, block_n, *, chunk=256):
    b, hq, width = ids.shape
    ids, rel_set = ids.to(torch.int32).contiguous(), rel_set.contiguous()
    columns = torch.empty(b, hq, n_qb, width, dtype=torch.int32, device=ids.device)
    count = torch.empty(b, hq, n_qb, dtype=torch.int32, device=ids.device)
    _column_lists_kernel[(n_qb, b * hq)](
        ids, rel_set, columns, count,
        ids.stride(0), ids.stride(1), rel_set.stride(0), rel_set.stride(1),
        hq, n_qb, -(-n_k // block_n), width, n_k, shift, base,
        BLOCK_M=block_m, BLOCK_N=block_n, CHUNK=chunk,
    )  # fmt: skip
    return columns, count


def column_lists_reference(ids, rel_set, base, n_qb, n_k, shift, block_m, block_n):
    b, hq, width = ids.shape
    query_blocks = torch.arange(n_qb, device=ids.device)
    row_end = ((query_blocks + 1) * block_m + shift).clamp_max(n_k)
    count = (ids[:, :, None, :] < row_end[:, None]).sum(-1, dtype=torch.int32)
    key_block = (ids.long() // block_n).clamp_max(-(-n_k // block_n) - 1)
    rel = key_block[:, :, None, :] - query_blocks[:, None] + base
    on_diagonal = rel_set[:, :, None, :].expand(b, hq, n_qb, rel_set.shape[-1]).gather(-1, rel) != 0
    return torch.where(on_diagonal, n_k, ids[:, :, None, :]).to(torch.int32), count


@torch.library.custom_op("sparsecomp::diagonal_column_lists", mutates_args=())
def diagonal_column_lists(
    ids: torch.Tensor,
    rel_set: torch.Tensor,
    base: int,
    n_qb: int,
    n_k: int,
    shift: int,
    block_m: int,
    block_n: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(columns, column_count) per query block (see the module notes): the Triton kernel on CUDA,
    the reference elsewhere."""
    if ids.is_cuda:
        return column_lists_triton(ids, rel_set, base, n_qb, n_k, shift, block_m, block_n)
    return column_lists_reference(ids, rel_set, base, n_qb, n_k, shift, block_m, block_n)


@diagonal_column_lists.register_fake
def _diagonal_column_lists_fake(ids, rel_set, base, n_qb, n_k, shift, block_m, block_n):
    b, hq, width = ids.shape
    return ids.new_empty(b, hq, n_qb, width, dtype=torch.int32), ids.new_empty(b, hq, n_qb, dtype=torch.int32)
