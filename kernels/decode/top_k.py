"""The n highest scores of each row as a fixed-size token list: radix threshold selection on the GPU.

torch.topk spends most of a sparse decode step at long contexts (67 us of 143 for 8 rows of 128K
keys on an H200), so on CUDA the selection is three small kernels over the (R, N) fp32 scores:
    1. a histogram of each row's scores on the top 11 bits of an order-preserving integer key;
    2. from it the bin t1 holding the n-th highest score; a histogram of the next 11 bits of the
       scores in that bin;
    3. from both the 22-bit threshold T; every key above T is listed, then keys equal to T up to n.
So the list holds exactly n tokens: all whose score is above the n-th highest, the rest among those
agreeing with it in the top 22 bits (sign, exponent and 13 mantissa bits: 2^-13 relative, below
the precision of bf16 labels), which torch.topk would break by position. Slots are claimed with
atomic counters, so the list's order (never its contents) varies from run to run; attention sums
over it, its fp32 accumulation order follows. Off CUDA the op is torch.topk.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BINS = 2048  # 11 bits per pass
BLOCK = 1024  # scores per program


# fmt: off
@triton.jit
def _order_key(s):
    """fp32 -> uint32 whose unsigned order is the float order (negative floats: all bits flipped)."""
    bits = s.to(tl.uint32, bitcast=True)
    return tl.where((bits >> 31) != 0, ~bits, bits | 0x80000000)


@triton.jit
def _row_keys(Scores, row, pid_n, n_keys, BLOCK: tl.constexpr):
    offs = pid_n * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n_keys
    u = _order_key(tl.load(Scores + row * n_keys + offs, mask=ok, other=0.0))
    return offs, ok, u


@triton.jit
def _add_histogram(HistRow, bins, counted, BINS: tl.constexpr, BLOCK: tl.constexpr):
    """Add the histogram of ``bins`` where ``counted`` (the others sit in bin 0 and are taken off)."""
    bins = tl.where(counted, bins, 0)
    j = tl.arange(0, BINS)
    counts = tl.histogram(bins, BINS) - tl.where(j == 0, BLOCK - tl.sum(counted.to(tl.int32), 0), 0)
    tl.atomic_add(HistRow + j, counts, mask=counts > 0, sem="relaxed")


@triton.jit
def _threshold(HistRow, need, BINS: tl.constexpr):
    """(t, above): the highest bin t with at least ``need`` scores in bins >= t, and how many
    scores lie in the bins above t."""
    h = tl.load(HistRow + tl.arange(0, BINS))
    at_or_above = tl.sum(h, 0) - tl.cumsum(h, 0) + h
    t = tl.sum((at_or_above >= need).to(tl.int32), 0) - 1
    above = tl.sum(tl.where(tl.arange(0, BINS) > t, h, 0), 0)
    return t, above


@triton.jit
def _histogram_high(Scores, Hist, n_keys, BINS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(1).to(tl.int64)
    offs, ok, u = _row_keys(Scores, row, tl.program_id(0), n_keys, BLOCK)
    _add_histogram(Hist + row * (2 * BINS + 2), (u >> 21).to(tl.int32), ok, BINS, BLOCK)


@triton.jit
def _histogram_low(Scores, Hist, n_keys, n, BINS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(1).to(tl.int64)
    hist = Hist + row * (2 * BINS + 2)
    t1, _ = _threshold(hist, n, BINS)
    offs, ok, u = _row_keys(Scores, row, tl.program_id(0), n_keys, BLOCK)
    in_bin = ok & ((u >> 21).to(tl.int32) == t1)
    _add_histogram(hist + BINS, ((u >> 10) & (BINS - 1)).to(tl.int32), in_bin, BINS, BLOCK)


@triton.jit
def _list_selected(Scores, Hist, Out, n_keys, n, BINS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(1).to(tl.int64)
    hist = Hist + row * (2 * BINS + 2)
    t1, above1 = _threshold(hist, n, BINS)
    t2, above2 = _threshold(hist + BINS, n - above1, BINS)
    threshold = t1 * BINS + t2
    offs, ok, u = _row_keys(Scores, row, tl.program_id(0), n_keys, BLOCK)
    key = (u >> 10).to(tl.int32)  # 22 bits: non-negative
    above = ok & (key > threshold)
    tie = ok & (key == threshold)
    counters = hist + 2 * BINS
    base = tl.atomic_add(counters, tl.sum(above.to(tl.int32), 0), sem="relaxed")
    slot = base + tl.cumsum(above.to(tl.int32), 0) - 1
    tl.store(Out + row * n + slot, offs, mask=above)
    tie_base = tl.atomic_add(counters + 1, tl.sum(tie.to(tl.int32), 0), sem="relaxed")
    slot = above1 + above2 + tie_base + tl.cumsum(tie.to(tl.int32), 0) - 1
    tl.store(Out + row * n + slot, offs, mask=tie & (slot < n))
# fmt: on


def top_tokens_triton(scores: torch.Tensor, n: int, launch=None) -> torch.Tensor:
    lead, n_keys = scores.shape[:-1], scores.shape[-1]
    flat = scores.reshape(-1, n_keys).float().contiguous()
    rows = flat.shape[0]
    hist = torch.zeros(rows, 2 * BINS + 2, dtype=torch.int32, device=scores.device)  # + 2 slot counters
    out = torch.empty(rows, n, dtype=torch.int32, device=scores.device)
    wrap = launch or (lambda f: f)
    grid = (triton.cdiv(n_keys, BLOCK), rows)
    wrap(_histogram_high)[grid](flat, hist, n_keys, BINS=BINS, BLOCK=BLOCK, num_warps=4)
    wrap(_histogram_low)[grid](flat, hist, n_keys, n, BINS=BINS, BLOCK=BLOCK, num_warps=4)
    wrap(_list_selected)[grid](flat, hist, out, n_keys, n, BINS=BINS, BLOCK=BLOCK, num_warps=4)
    return out.view(*lead, n)


def top_tokens_reference(scores: torch.Tensor, n: int) -> torch.Tensor:
    return torch.topk(scores, n, dim=-1, sorted=False).indices.to(torch.int32)


@torch.library.triton_op("sparsecomp::top_tokens", mutates_args=())
def top_tokens(scores: torch.Tensor, n: int) -> torch.Tensor:
    """(..., n) int32: the n highest-scoring keys of each row of ``scores`` (..., N), unordered
    (entries scoring -inf are masked by the decode kernel's validity rule, so a list longer than
    the valid keys is still exact)."""
    if not 1 <= n <= scores.shape[-1]:
        raise ValueError(f"top {n} of {scores.shape[-1]} keys: n must be in [1, {scores.shape[-1]}]")
    if scores.is_cuda:
        return top_tokens_triton(scores, n, launch=torch.library.wrap_triton)
    return top_tokens_reference(scores, n)


@top_tokens.register_fake
def _top_tokens_fake(scores, n):
    return scores.new_empty(*scores.shape[:-1], n, dtype=torch.int32)
