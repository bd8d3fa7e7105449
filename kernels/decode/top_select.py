"""Exact top-n of each row of a score matrix, by radix selection on the GPU (a decode step's
top tokens or pages: ``selection.top_tokens``).

torch.topk took 61% of a Double Sparsity decode step's attention at 128K keys, batch 1 (0.067 of
0.109 ms on the H200): a sort-based selection over few long rows. Here a row's n-th best score is
found digit by digit, with every program of the grid working on one chunk of one row:

    rank key  rk = 2^32 - 1 - (the float's bits mapped to an order-preserving uint32): best first;
    digits    rk[31:21], rk[20:10], rk[9:0] (2048, 2048 and 1024 bins);
    level L   each chunk histograms digit L of its keys whose higher digits equal the thresholds
              found so far (tl.histogram, then one atomic add per non-empty bin); the next launch
              scans the row's histogram: the threshold digit is the bin where the running count
              reaches what is still needed.

After three levels the n-th best rank key T is known, and how many keys equal to it are taken
(``need``). A count pass and a write pass then list, in index order, every key ranking before T,
then the first ``need`` keys equal to T (ties go to the lowest index): deterministic, the same set
as a stable descending sort. Six launches (one memset) of small grids, no host sync, fixed-size
output: CUDA-graph capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 2048  # keys per program
BINS = 2048  # per level (the last level uses half)
_SHIFTS = (21, 10, 0)


# fmt: off
@triton.jit
def _rank_keys(Scores, row, n_keys, offs):
    """int64 rank keys of scores[row, offs] (0 = best; keys past the row: past every real key)."""
    ok = offs < n_keys
    s = tl.load(Scores + row * n_keys + offs, mask=ok, other=float("-inf"))
    s = tl.where(s == 0.0, 0.0, s)  # -0.0 ties with 0.0, as in a float comparison
    bits = s.to(tl.uint32, bitcast=True).to(tl.int64)
    negative = bits >= 2147483648
    ordered = tl.where(negative, 4294967295 - bits, bits + 2147483648)  # ascending with the float
    return tl.where(ok, 4294967295 - ordered, 4294967296), ok


@triton.jit
def _digit(rk, LEVEL: tl.constexpr):
    if LEVEL == 0:
        return (rk >> 21) & 2047
    elif LEVEL == 1:
        return (rk >> 10) & 2047
    else:
        return rk & 1023


@triton.jit
def _threshold(Hist, row, need, NB: tl.constexpr):
    """(digit, still needed after the keys of lower digits) where the row's running count reaches ``need``."""
    bins = tl.arange(0, NB)
    h = tl.load(Hist + row * NB + bins)
    before = tl.cumsum(h, 0) - h
    t = tl.sum((before + h < need).to(tl.int32), 0)
    return t, need - tl.sum(tl.where(bins < t, h, 0), 0)


@triton.jit
def _prefix(Hist, row, n_pick, LEVELS: tl.constexpr, NB: tl.constexpr, HIST_STRIDE):
    """The rank-key prefix (digits of levels < LEVELS, in place) and what is still needed."""
    prefix = tl.zeros([], tl.int64)
    need = n_pick
    for level in tl.static_range(LEVELS):
        t, need = _threshold(Hist + level * HIST_STRIDE, row, need, NB)
        shift: tl.constexpr = 21 if level == 0 else (10 if level == 1 else 0)
        prefix += t.to(tl.int64) << shift
    return prefix, need


@triton.jit
def _histogram(Scores, Hist, n_keys, n_pick, hist_stride,
               LEVEL: tl.constexpr, CHUNK: tl.constexpr, NB: tl.constexpr, DIRECT: tl.constexpr):
    chunk = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    rk, ok = _rank_keys(Scores, row, n_keys, offs)
    prefix, _ = _prefix(Hist, row, n_pick, LEVEL, NB, hist_stride)
    high = 11 if LEVEL == 1 else 22  # bits of the levels above, counted from the top
    match = ok if LEVEL == 0 else ok & ((rk >> (32 - high)) == (prefix >> (32 - high)))
    if DIRECT:  # one atomic per key
        tl.atomic_add(Hist + LEVEL * hist_stride + row * NB + _digit(rk, LEVEL), 1, mask=match, sem="relaxed")
    else:  # the chunk's histogram, then one atomic per non-empty bin
        digit = tl.where(match, _digit(rk, LEVEL), NB)  # non-matching keys: a bin past the row's
        h = tl.histogram(digit.to(tl.int32), 2 * NB)
        bins = tl.arange(0, 2 * NB)
        tl.atomic_add(Hist + LEVEL * hist_stride + row * NB + bins, h, mask=(h > 0) & (bins < NB), sem="relaxed")


@triton.jit
def _count(Scores, Hist, Counts, n_keys, n_pick, hist_stride, n_chunks,
           CHUNK: tl.constexpr, NB: tl.constexpr):
    chunk = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    rk, ok = _rank_keys(Scores, row, n_keys, offs)
    t, _ = _prefix(Hist, row, n_pick, 3, NB, hist_stride)
    tl.store(Counts + (row * n_chunks + chunk) * 2, tl.sum((ok & (rk < t)).to(tl.int32), 0))
    tl.store(Counts + (row * n_chunks + chunk) * 2 + 1, tl.sum((ok & (rk == t)).to(tl.int32), 0))


@triton.jit
def _write(Scores, Hist, Counts, Out, n_keys, n_pick, hist_stride, n_chunks,
           CHUNK: tl.constexpr, NB: tl.constexpr, BLOCK_CHUNKS: tl.constexpr):
    chunk = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    rk, ok = _rank_keys(Scores, row, n_keys, offs)
    t, need = _prefix(Hist, row, n_pick, 3, NB, hist_stride)
    earlier = tl.arange(0, BLOCK_CHUNKS)
    before = earlier < chunk
    base = Counts + (row * n_chunks + earlier) * 2
    start_best = tl.sum(tl.load(base, mask=before, other=0), 0)
    start_tie = tl.sum(tl.load(base + 1, mask=before, other=0), 0)
    best = ok & (rk < t)
    slot = start_best + tl.cumsum(best.to(tl.int32), 0) - 1
    tl.store(Out + row * n_pick + slot, offs, mask=best)
    tie = ok & (rk == t)
    rank = start_tie + tl.cumsum(tie.to(tl.int32), 0) - 1
    take = tie & (rank < need)
    tl.store(Out + row * n_pick + (n_pick - need) + rank, offs, mask=take)
# fmt: on


def top_indices_triton(scores: torch.Tensor, n: int, direct: bool = False, chunk: int = CHUNK) -> torch.Tensor:
    """(..., n) int32: indices of the n best of each row of ``scores`` (..., N) float32: every key
    ranking before the n-th best in index order, then ties of the n-th best by lowest index."""
    *lead, n_keys = scores.shape
    if not 0 <= n <= n_keys:
        raise ValueError(f"top-n selection needs 0 <= n <= {n_keys} (the row's length); got n={n}")
    if n == 0:
        return torch.empty(*lead, 0, dtype=torch.int32, device=scores.device)
    rows = scores.reshape(-1, n_keys).float().contiguous()
    n_rows = rows.shape[0]
    n_chunks = triton.cdiv(n_keys, chunk)
    hist = torch.zeros(3, n_rows, BINS, dtype=torch.int32, device=scores.device)
    counts = torch.empty(n_rows, n_chunks, 2, dtype=torch.int32, device=scores.device)
    out = torch.empty(n_rows, n, dtype=torch.int32, device=scores.device)
    grid = (n_chunks, n_rows)
    stride = n_rows * BINS
    for level in range(3):
        _histogram[grid](rows, hist, n_keys, n, stride, LEVEL=level, CHUNK=chunk, NB=BINS, DIRECT=direct, num_warps=4)
    _count[grid](rows, hist, counts, n_keys, n, stride, n_chunks, CHUNK=chunk, NB=BINS, num_warps=4)
    _write[grid](rows, hist, counts, out, n_keys, n, stride, n_chunks, CHUNK=chunk, NB=BINS,
                 BLOCK_CHUNKS=max(16, triton.next_power_of_2(n_chunks)), num_warps=4)  # fmt: skip
    return out.view(*lead, n)


def top_indices_reference(scores: torch.Tensor, n: int) -> torch.Tensor:
    """The same selection in PyTorch: a stable descending sort (ties by lowest index), the first n,
    keys ranking before the n-th best's score first, each part in index order."""
    *lead, n_keys = scores.shape
    if not 0 <= n <= n_keys:
        raise ValueError(f"top-n selection needs 0 <= n <= {n_keys} (the row's length); got n={n}")
    if n == 0:
        return torch.empty(*lead, 0, dtype=torch.int32, device=scores.device)
    order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices[..., :n]
    last = torch.gather(scores.float(), -1, order[..., -1:])
    before = torch.gather(scores.float(), -1, order) > last
    # keys before the n-th best's score, then its ties, each in index order
    key = (~before).long() * scores.shape[-1] + order
    return torch.gather(order, -1, key.argsort(-1)).to(torch.int32)


@torch.library.custom_op("sparsecomp::top_indices", mutates_args=())
def top_indices(scores: torch.Tensor, n: int) -> torch.Tensor:
    """The n best of each row (see ``top_indices_triton``); off CUDA the reference."""
    if scores.is_cuda:
        return top_indices_triton(scores, n)
    return top_indices_reference(scores, n)


@top_indices.register_fake
def _top_indices_fake(scores, n):
    return scores.new_empty(*scores.shape[:-1], n, dtype=torch.int32)
