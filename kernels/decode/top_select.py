"""Exact top-n of each row of a score matrix, by radix selection on the GPU (a decode step's
top tokens or pages: ``selection.top_tokens``).

torch.topk took 61% of a Double Sparsity decode step's attention at 128K keys, batch 1 (0.067 of
0.109 ms on the H200): a sort-based selection over few long rows. Here a row's n-th best score is
found digit by digit, with every program of the grid working on one chunk of one row:

    rank key  rk = 2^32 - 1 - (the float's bits mapped to an order-preserving uint32): best first;
    digits    rk[31:24], rk[23:16], rk[15:8], rk[7:0] (256 bins each);
    level L   each chunk histograms digit L of its keys whose higher digits equal the thresholds
              found so far (tl.histogram over 256 bins, then one atomic add per non-empty bin);
              later launches scan the row's histogram: the threshold digit is the bin where the
              running count reaches what is still needed.

Eight-bit digits because tl.histogram's cost grows with its bins (it counts by warp ballots per
bin): 2048-bin levels were 4x slower than torch.topk; one global atomic per key instead crowds a
few hot bins (the exponent bits of similar scores).

After four levels the n-th best rank key T is known, and how many keys equal to it are taken
(``need``). A count pass and a write pass then list, in index order, every key ranking before T,
then the first ``need`` keys equal to T (ties go to the lowest index): deterministic, the same set
as a stable descending sort. Seven launches (one memset) of small grids, no host sync, fixed-size
output: CUDA-graph capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BINS = 256  # per level: one 8-bit digit (the kernels spell it out: 256 bins, shifts of 8)
LEVELS = 4


def chunk_size(n_keys: int) -> int:
    """Keys per program: small rows in small chunks (more programs), long ones in 2048."""
    return 1024 if n_keys <= 32768 else 2048


# fmt: off
@triton.jit
def _rank_keys(Scores, row, n_keys, offs):
    """int64 rank keys of scores[row, offs] (0 = best) and which offsets lie in the row."""
    ok = offs < n_keys
    s = tl.load(Scores + row * n_keys + offs, mask=ok, other=float("-inf"))
    s = tl.where(s == 0.0, 0.0, s)  # -0.0 ties with 0.0, as in a float comparison
    bits = s.to(tl.uint32, bitcast=True).to(tl.int64)
    negative = bits >= 2147483648
    ordered = tl.where(negative, 4294967295 - bits, bits + 2147483648)  # ascending with the float
    return 4294967295 - ordered, ok


@triton.jit
def _threshold(Hist, row, need):
    """(digit, still needed after the keys of lower digits) where the row's running count reaches ``need``."""
    bins = tl.arange(0, 256)
    h = tl.load(Hist + row * 256 + bins)
    t = tl.sum((tl.cumsum(h, 0) < need).to(tl.int32), 0)
    return t, need - tl.sum(tl.where(bins < t, h, 0), 0)


@triton.jit
def _prefix(Hist, row, n_pick, hist_stride, LEVELS: tl.constexpr):
    """The rank-key prefix (the threshold digits of levels < LEVELS, in place) and what is still needed."""
    prefix = tl.zeros([], tl.int64)
    need = n_pick
    for level in tl.static_range(LEVELS):
        t, need = _threshold(Hist + level * hist_stride, row, need)
        prefix += t.to(tl.int64) << (24 - 8 * level)
    return prefix, need


@triton.jit
def _histogram(Scores, Hist, n_keys, n_pick, hist_stride, LEVEL: tl.constexpr, CHUNK: tl.constexpr):
    chunk = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    rk, ok = _rank_keys(Scores, row, n_keys, offs)
    prefix, _ = _prefix(Hist, row, n_pick, hist_stride, LEVEL)
    match = ok
    if LEVEL > 0:
        match = ok & ((rk >> (32 - 8 * LEVEL)) == (prefix >> (32 - 8 * LEVEL)))
    digit = (rk >> (24 - 8 * LEVEL)) & 255
    # keys that don't match are counted in bin 0, then taken out again
    h = tl.histogram(tl.where(match, digit, 0).to(tl.int32), 256)
    bins = tl.arange(0, 256)
    h -= tl.where(bins == 0, CHUNK - tl.sum(match.to(tl.int32), 0), 0)
    tl.atomic_add(Hist + LEVEL * hist_stride + row * 256 + bins, h, mask=h > 0, sem="relaxed")


@triton.jit
def _count(Scores, Hist, Counts, n_keys, n_pick, hist_stride, n_chunks, CHUNK: tl.constexpr, LEVELS: tl.constexpr):
    chunk = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    rk, ok = _rank_keys(Scores, row, n_keys, offs)
    t, _ = _prefix(Hist, row, n_pick, hist_stride, LEVELS)
    tl.store(Counts + (row * n_chunks + chunk) * 2, tl.sum((ok & (rk < t)).to(tl.int32), 0))
    tl.store(Counts + (row * n_chunks + chunk) * 2 + 1, tl.sum((ok & (rk == t)).to(tl.int32), 0))


@triton.jit
def _write(Scores, Hist, Counts, Out, n_keys, n_pick, hist_stride, n_chunks,
           CHUNK: tl.constexpr, BLOCK_CHUNKS: tl.constexpr, LEVELS: tl.constexpr):
    chunk = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    rk, ok = _rank_keys(Scores, row, n_keys, offs)
    t, need = _prefix(Hist, row, n_pick, hist_stride, LEVELS)
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


def _check(n_keys: int, n: int) -> None:
    if not 0 <= n <= n_keys:
        raise ValueError(f"top-n selection needs 0 <= n <= {n_keys} (the row's length); got n={n}")


def top_indices_triton(scores: torch.Tensor, n: int, chunk: int | None = None) -> torch.Tensor:
    """(..., n) int32: indices of the n best of each row of ``scores`` (..., N) float32: every key
    ranking before the n-th best in index order, then ties of the n-th best by lowest index.
    ``chunk`` (keys per program, a power of two) only changes the speed."""
    *lead, n_keys = scores.shape
    _check(n_keys, n)
    if n == 0:
        return torch.empty(*lead, 0, dtype=torch.int32, device=scores.device)
    chunk = chunk or chunk_size(n_keys)
    rows = scores.reshape(-1, n_keys).float().contiguous()
    n_rows = rows.shape[0]
    n_chunks = triton.cdiv(n_keys, chunk)
    hist = torch.zeros(LEVELS, n_rows, BINS, dtype=torch.int32, device=scores.device)
    counts = torch.empty(n_rows, n_chunks, 2, dtype=torch.int32, device=scores.device)
    out = torch.empty(n_rows, n, dtype=torch.int32, device=scores.device)
    grid = (n_chunks, n_rows)
    stride = n_rows * BINS
    for level in range(LEVELS):
        _histogram[grid](rows, hist, n_keys, n, stride, LEVEL=level, CHUNK=chunk, num_warps=4)
    _count[grid](rows, hist, counts, n_keys, n, stride, n_chunks, CHUNK=chunk, LEVELS=LEVELS, num_warps=4)
    _write[grid](rows, hist, counts, out, n_keys, n, stride, n_chunks, CHUNK=chunk,
                 BLOCK_CHUNKS=max(16, triton.next_power_of_2(n_chunks)), LEVELS=LEVELS, num_warps=4)  # fmt: skip
    return out.view(*lead, n)


def top_indices_reference(scores: torch.Tensor, n: int) -> torch.Tensor:
    """The same selection in PyTorch: a stable descending sort (ties by lowest index), the first n,
    keys ranking before the n-th best's score first, each part in index order."""
    *lead, n_keys = scores.shape
    _check(n_keys, n)
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
