"""Index builders: from positions and per-head local rules to the block-sparse index.

Notation (shared with ``sparse_attention.py``):
    B batch, Hq query heads, Nq / Nk query / key lengths, BM / BN query / key block sizes,
    nQB = ceil(Nq / BM), nKB = ceil(Nk / BN), L = the index's list length (a proven upper bound).
    q_pos (Bq, Nq), k_pos (Bk, Nk): integer positions; B* = 1 means the same for every batch row.
    key_ok (B, Nk) bool or None: padding (False = the key does not exist).
    A head keeps key j for query i when (structure) key_ok[j], causal: k_pos[j] <= q_pos[i],
    window W > 0: q_pos[i] - k_pos[j] < W; and (local rule of head h) window_h <= 0, or
    q_pos[i] - k_pos[j] < window_h, or 0 <= j - first_valid_key < sink_h (the keys before the
    first valid one are padding: no sink, and no block listed for them).

The index lists, per (batch, head, query block), the key blocks that hold at least one kept pair:
``full`` blocks keep every pair (the kernel computes them without a mask) and ``part`` blocks keep
some (the kernel applies the element mask). Everything here is tensor code on the inputs' device,
traced into the compiled graph: no N x N tensor, no host sync.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class SparseIndex(NamedTuple):
    """B' and H' are the batch and head counts, or 1 where every row or head shares the lists.
    The index carries its block sizes (as FlexAttention's BlockMask does): they decide what the
    lists mean, so the kernel must run with the same ones (``sparse_attention_call`` checks)."""

    full_blocks: torch.Tensor  # (B', H', nQB, L) int32, ascending key-block ids, tail unused
    full_count: torch.Tensor  # (B', H', nQB) int32
    part_blocks: torch.Tensor  # (B', H', nQB, L) int32
    part_count: torch.Tensor  # (B', H', nQB) int32
    block_m: int  # BM: query rows per query block
    block_n: int  # BN: keys per key block
    # (B', H', nQB or 1, C) int32 single keys outside the row's listed blocks; entries >= Nk are
    # skipped. With 1 row, every query block reads a prefix of one list (its count).
    columns: torch.Tensor | None = None
    column_count: torch.Tensor | None = None  # (B', H', nQB) int32

    @property
    def tensors(self) -> tuple:
        """The six tensors in the op's argument order (full, part, columns: lists then counts)."""
        return self.full_blocks, self.full_count, self.part_blocks, self.part_count, self.columns, self.column_count


def index_positions(x: torch.Tensor, dim: int, offset: int = 0) -> torch.Tensor:
    """Positions ``offset + arange(x.shape[dim])`` as a (1, N) int64 tensor on x's device."""
    return (torch.arange(x.shape[dim], device=x.device) + offset).unsqueeze(0)


def check_keys(n_k: int, key_ok: torch.Tensor | None) -> None:
    """Raise ValueError for keys no index builder or kernel can take: none at all, or padding that
    is not a (B or 1, Nk) bool mask (the kernel reads it as bytes, one per key)."""
    if n_k == 0:
        raise ValueError("got Nk=0 keys; attention needs at least one key")
    if key_ok is None:
        return
    if key_ok.dtype != torch.bool:
        raise ValueError(f"key_ok has dtype {key_ok.dtype}; supported: torch.bool (True = the key exists)")
    if key_ok.dim() != 2 or key_ok.shape[-1] != n_k:
        raise ValueError(f"key_ok has shape {tuple(key_ok.shape)}; expected (B or 1, Nk={n_k})")


def first_valid_key(key_ok: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Index of each batch row's first existing key (sinks count from there), shape (B or 1,)."""
    if key_ok is None:
        return torch.zeros(1, dtype=torch.int64, device=device)
    check_keys(key_ok.shape[-1], key_ok)
    return key_ok.to(torch.int8).argmax(dim=-1)


def last_valid_key(key_ok: torch.Tensor) -> torch.Tensor:
    """Index of each batch row's last existing key, shape (B or 1, 1)."""
    return (key_ok * torch.arange(key_ok.shape[-1], device=key_ok.device)).amax(-1, keepdim=True)


def block_index_bound(
    head_sink: list[int],
    head_window: list[int],
    *,
    causal: bool,
    window: int,
    block_m: int,
    block_n: int,
    positions_are_indices: bool,
) -> int | None:
    """A proven upper bound on the kept key blocks per query block (the index's list length L).

    When positions are plain indices and the site is causal, a row keeps at most its window of
    keys, so a query block spans ``BM + W - 1`` keys (+1 block for misalignment) plus its sinks:
    ``sink`` consecutive keys from the first valid one, wherever padding puts it (+1 block for
    misalignment). The builder lists no other block (padding makes no block a sink block), so its
    counts never exceed this. Otherwise nothing is bounded (None: L is the number of key blocks).
    """
    if not (causal and positions_are_indices):
        return None
    bound = 0
    for sink, head_w in zip(head_sink, head_window, strict=True):
        spans = [w for w in (head_w, window) if w > 0]
        if not spans:
            return None
        span = min(spans)
        blocks = -(-(block_m + span - 1) // block_n) + 1
        if sink > 0 and head_w > 0:
            blocks += -(-sink // block_n) + 1
        bound = max(bound, blocks)
    return bound


def _block_bounds(pos: torch.Tensor, valid: torch.Tensor | None, block: int, n_blocks):
    """Per-block (min, max) of positions over valid entries; a block with none gets min > max.

    The tail past N repeats the last entry (a gather with clamped indices), which leaves every
    block's min and max unchanged. No sentinel constants: Inductor's GPU lowering of a padding
    value of 2**40 wrapped it to 0 (seen on torch 2.11), which marked future key blocks as kept.
    """
    n = pos.shape[-1]
    tail_clamped = torch.arange(n_blocks * block, device=pos.device).clamp_max(n - 1)
    pos = pos.to(torch.int64)
    lo = hi = pos
    if valid is not None:
        lo = torch.where(valid, pos, pos.max() + 1)
        hi = torch.where(valid, pos, pos.min() - 1)
    lo = lo[..., tail_clamped].view(*lo.shape[:-1], n_blocks, block).amin(-1)
    hi = hi[..., tail_clamped].view(*hi.shape[:-1], n_blocks, block).amax(-1)
    return lo, hi


def _compact(keep: torch.Tensor, length) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept block ids first, in ascending order, cut to ``length``; and their count."""
    count = keep.sum(-1, dtype=torch.int32)
    order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices
    return order[..., :length].to(torch.int32).contiguous(), count


def _sink_bounds(k_pos, key_ok, start, head_sink, block_n: int, k_lo, k_hi, any_exist):
    """Per (batch, head, key block), (B', H', 1, nKB): whether the block holds a sink key of the
    head (an existing key j with start <= j < start + sink_h) and the (min, max) position of those.

    Keys before ``start`` never exist (it is the first existing one), so a head's sinks are the
    existing keys below ``end = start + sink_h``: every existing key of the blocks before end's
    block (their bounds are the block's), and a prefix of end's block, gathered (B', H', BN). A
    sink of 0 has none, whatever the padding. (Testing ``block_first - start < sink`` instead made
    the block holding the first existing key a sink block for every query block when padding puts
    start inside it: one block more than ``block_index_bound`` counts, so the diagonal was cut.)
    The sinks' own positions, not their block's, then meet the structure (causal, site window).
    """
    n_k = k_pos.shape[-1]
    sink = head_sink.to(torch.int64)[None, :]  # (1, H')
    end = start.to(torch.int64)[:, None] + sink  # (B or 1, H'): first index past the sinks
    end_block = (end - 1).clamp_min(0) // block_n
    idx = end_block[..., None] * block_n + torch.arange(block_n, device=k_pos.device)  # (B*, H', BN)
    taken = (idx < end[..., None]) & (idx < n_k)
    idx = idx.clamp_max(n_k - 1)
    pos = k_pos.to(torch.int64)
    rows = max(pos.shape[0], idx.shape[0], key_ok.shape[0] if key_ok is not None else 1)
    shape = (rows, idx.shape[1], block_n)
    kp = torch.gather(pos[:, None, :].expand(rows, idx.shape[1], n_k), -1, idx.expand(shape))
    if key_ok is not None:
        ok = key_ok[:, None, :].expand(rows, idx.shape[1], n_k)
        taken = taken & torch.gather(ok, -1, idx.expand(shape))
    end_lo = torch.where(taken, kp, pos.max() + 1).amin(-1)[..., None, None]  # (B*, H', 1, 1)
    end_hi = torch.where(taken, kp, pos.min() - 1).amax(-1)[..., None, None]
    end_any = taken.any(-1)[..., None, None]
    blk = torch.arange(k_lo.shape[-1], device=k_pos.device)[None, None, None, :]
    before, at = blk < end_block[..., None, None], blk == end_block[..., None, None]
    has = (sink > 0)[..., None, None]
    sink_any = has & ((before & any_exist) | (at & end_any))
    return sink_any, torch.where(at, end_lo, k_lo), torch.where(at, end_hi, k_hi)


def build_block_index(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    key_ok: torch.Tensor | None,
    head_sink: torch.Tensor,
    head_window: torch.Tensor,
    *,
    causal: bool,
    window: int,
    block_m: int,
    block_n: int,
    max_blocks: int | None,
) -> SparseIndex:
    """Block index of the structure (causal, window, padding) and the per-head local rules."""
    n_q, n_k = q_pos.shape[-1], k_pos.shape[-1]
    check_keys(n_k, key_ok)
    n_qb, n_kb = -(-n_q // block_m), -(-n_k // block_n)
    q_lo, q_hi = _block_bounds(q_pos, None, block_m, n_qb)  # (Bq, nQB)
    k_lo, k_hi = _block_bounds(k_pos, key_ok, block_n, n_kb)  # (Bk or B, nKB)
    q_lo, q_hi = q_lo[:, None, :, None], q_hi[:, None, :, None]  # (B', 1, nQB, 1)
    k_lo, k_hi = k_lo[:, None, None, :], k_hi[:, None, None, :]  # (B', 1, 1, nKB)

    # Every key of the block exists (no padding and inside Nk).
    key_idx = torch.arange(n_kb * block_n, device=k_pos.device)
    exists = key_idx < n_k
    if key_ok is not None:
        exists = exists & key_ok[..., key_idx.clamp_max(n_k - 1)]
    all_exist = exists.view(-1, n_kb, block_n).all(-1)[:, None, None, :]
    any_exist = k_lo <= k_hi

    some, every = any_exist, all_exist
    if causal:
        some, every = some & (k_lo <= q_hi), every & (k_hi <= q_lo)
    if window > 0:
        some, every = some & (q_lo - k_hi < window), every & (q_hi - k_lo < window)

    # Local rule per head: the head's window, or sinks (counted from the first existing key).
    w = head_window.to(torch.int64)[None, :, None, None]
    s = head_sink.to(torch.int64)[None, :, None, None]
    start = first_valid_key(key_ok, k_pos.device)
    blk_last = torch.arange(1, n_kb + 1, device=k_pos.device) * block_n
    blk_last = torch.minimum(blk_last, torch.full_like(blk_last, n_k))[None, None, None, :] - 1
    sink_any, sink_lo, sink_hi = _sink_bounds(k_pos, key_ok, start, head_sink, block_n, k_lo, k_hi, any_exist)
    sink_some = sink_any
    if causal:
        sink_some = sink_some & (sink_lo <= q_hi)
    if window > 0:
        sink_some = sink_some & (q_lo - sink_hi < window)
    unlimited = w <= 0
    local_some = unlimited | (q_lo - k_hi < w) | sink_some
    # Every key of the block a sink: keys before ``start`` are padding, so ``every`` already
    # excludes blocks that hold any.
    local_every = unlimited | (q_hi - k_lo < w) | (blk_last < start[:, None, None, None] + s)

    length = n_kb if max_blocks is None else torch.sym_min(n_kb, max_blocks)
    keep = some & local_some
    full = keep & every & local_every
    full_blocks, full_count = _compact(full, length)
    part_blocks, part_count = _compact(keep & ~full, length)
    return SparseIndex(full_blocks, full_count, part_blocks, part_count, block_m, block_n)
