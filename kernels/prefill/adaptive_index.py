"""Content-aware index builders: the pattern is estimated from Q and K inside the compiled graph.

Notation as in ``block_index.py`` (B, Hq, Hkv, Nq, Nk, BM = BN = b, nQB, nKB). Queries are the last
Nq of the Nk keys' positions (prefill: Nq = Nk; a chunk after cached keys: Nq < Nk), so query row i
sits at key index i + s with s = Nk - Nq. Every builder picks, per (batch, query head):

* key blocks, as a (B, Hq, nQB, nKB) bool selection; ``index_from_selection`` intersects it with the
  structure (causal, window, padding) and splits it into full and part lists as the kernel reads them;
* optionally single key columns outside the selected blocks.

The patterns (each defined exactly here; the tests' dense references follow these words):

vertical_slash (MInference): the last ``last_q`` query rows attend (softmax, fp32) to every key
    they may see. Column score = attention summed over those rows; slash score of offset
    o = q_index - k_index = the same summed along that diagonal. Keep the first ``sink`` keys
    plus the top ``n_vertical`` other columns, and offsets below ``local`` plus the top
    ``n_slash`` other offsets (only entries with a positive score count as top). With ``mass``
    < 1 (FlexPrefill's cumulative-attention rule, under MInference's budgets), of those top entries
    keep only the fewest whose scores, added to the forced ones', reach ``mass`` of the total
    column (slash) score: budget slots that would hold no attention stay empty. A kept offset o
    selects every block pair (i, j) whose full BM x BN extent (a partial last block counted
    whole) holds a pair at that offset; kept columns not inside a selected block of query block
    i are gathered as single columns.
sample (SampleAttention): R = ``ceil(sample_ratio * Nq)`` evenly spaced query rows (rows
    Nq - 1 - floor(m Nq / R) for m = 0 .. R - 1: the last row included; ratios read as exact
    fractions) attend to every key they may see; column score = attention summed over those rows.
    Keep the fewest top-scoring columns whose score reaches ``alpha`` of the total (cumulative
    residual attention), plus a local band: the blocks within ``ceil(window_ratio * Nk)`` keys of
    the diagonal, whole blocks. Kept columns left of the band are gathered as single columns.
block_topk (MoBA / Quest-style): mean-pooled queries of each query block score the mean-pooled
    keys of each key block (``pool="minmax"``: Quest's upper bound sum_d max(q_d min_d, q_d max_d)
    over the block's keys instead). Keep the diagonal blocks and the first block, plus the top
    ``k`` other visible blocks, or (``coverage`` > 0) the fewest whose softmax mass over the visible
    blocks reaches ``coverage``.

Per-head budgets are tensors of one value per query head (graph constants). Memory: the selection
is nQB x nKB bools per head (never Nq x Nk); score estimation is chunked to bound its size.
"""

from __future__ import annotations

from fractions import Fraction

import torch

from .block_index import SparseIndex, first_valid_key
from .block_lists import block_limits, compact, diagonal_block_lists, diagonal_column_lists, structure_blocks
from .column_mass import column_mass, column_slash_mass

# ---- shared: structure, selection -> index --------------------------------------------------------


def _structure(q_pos, k_pos, key_ok, *, causal: bool, window: int, block_m: int, block_n: int):
    """(some, every): (B', 1, nQB, nKB) whether a block pair holds some / only pairs the structure keeps."""
    limits = block_limits(q_pos, k_pos, key_ok, block_m, block_n)
    return structure_blocks(limits, causal=causal, window=window)


def index_from_selection(selected, q_pos, k_pos, key_ok, *, causal, window, block_m, block_n, columns=None):
    """The sparse index of the selected blocks that the structure keeps: full / part lists, plus the
    given (columns, column_count) unchanged."""
    some, every = _structure(q_pos, k_pos, key_ok, causal=causal, window=window, block_m=block_m, block_n=block_n)
    keep = selected & some
    full_blocks, full_count = compact(keep & every)
    part_blocks, part_count = compact(keep & ~every)
    cols, col_count = columns if columns is not None else (None, None)
    return SparseIndex(full_blocks, full_count, part_blocks, part_count, block_m, block_n, cols, col_count)


def _check_blocks(block_m: int, block_n: int, name: str):
    if block_m != block_n:
        raise ValueError(f"{name} needs square blocks (offsets map to block diagonals); got {block_m} x {block_n}")


def per_head_values(values, hq: int) -> list:
    """A budget given once or per query head (Python numbers: graph constants) as one per head."""
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    # Two plain comparisons, not `len(values) in (1, hq)`: Dynamo evaluates that membership test
    # wrongly when hq is symbolic (a dynamic compile) and raised here.
    if len(values) == 1:
        return values * int(hq)
    if len(values) != hq:
        raise ValueError(f"per-head budget has {len(values)} entries; Hq={hq}")
    return values


def _head_limits(values: list, device, trailing: int):
    """Per-head budgets as a comparison operand: a Python number when every head has the same, else
    an (Hq, 1, ...) tensor with ``trailing`` singleton dims. Neither copies from the host, so the
    builder stays CUDA-graph capturable."""
    if len(set(values)) == 1:
        return values[0]
    # Built from Python constants by selects Inductor fuses into one kernel: torch.tensor(values)
    # would copy from the host on every call (and break CUDA-graph capture).
    heads = torch.arange(len(values), device=device)
    limits = torch.full((len(values),), values[0], device=device)
    for h, value in enumerate(values):
        if value != values[0]:
            limits = torch.where(heads == h, value, limits)
    return limits.view(-1, *([1] * trailing))


def _mass_before(ordered: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Along the last dim: the sum of the entries before each one (exclusive prefix sum), and the
    total. Taken from one inclusive cumsum, shifted: torch 2.11's Inductor fails to generate the
    GPU scan for ``cumsum(x) - x`` (or with a separate sum) over rows of 16K+ entries."""
    running = torch.cumsum(ordered, -1)
    return torch.nn.functional.pad(running[..., :-1], (1, 0)), running[..., -1:]


def keep_top(scores: torch.Tensor, forced: torch.Tensor, budget: list[int], mass: float = 1.0) -> torch.Tensor:
    """Bool mask (B, Hq, N): the ``forced`` entries plus each head's ``budget[h]`` best others with a
    positive score (zero-score entries are never seen: picking among them would be arbitrary); with
    ``mass`` < 1, only the fewest of those whose scores, added to the forced ones', reach ``mass`` of
    the total score."""
    free = scores.masked_fill(forced, 0.0)
    k = max(1, min(max(budget), scores.shape[-1]))
    top = free.topk(k, dim=-1)
    per_head = _head_limits(budget, scores.device, trailing=1)
    rank_ok = (torch.arange(k, device=scores.device)[None, None, :] < per_head) & (top.values > 0)
    if mass < 1:
        before = (scores - free).sum(-1, keepdim=True) + _mass_before(top.values)[0]
        rank_ok = rank_ok & (before < mass * scores.sum(-1, keepdim=True))
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top.indices, rank_ok) | forced


# ---- vertical-slash --------------------------------------------------------------------------------


def vertical_slash_selection(
    q, k, q_pos, k_pos, key_ok, n_vertical, n_slash, *, last_q: int, sink: int, local: int, scale: float,
    causal: bool, window: int, mass: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The kept key columns and slash offsets (q_index - k_index), each (B, Hq, Nk) bool: what the
    vertical-slash index lowers to blocks and columns (also read by the granularity benchmark)."""
    if not causal:
        raise ValueError("vertical_slash needs a causal site (slash offsets are q_index - k_index >= 0)")
    hq, n_q, n_k, dev = q.shape[1], q.shape[2], k.shape[2], q.device
    nv, ns = per_head_values(n_vertical, hq), per_head_values(n_slash, hq)
    first = max(0, n_q - last_q)  # the scoring rows: the last ones, consecutive
    q_rows, row_pos = q[:, :, first:], q_pos[:, first:]
    vertical, slash = column_slash_mass(q_rows, k, row_pos, k_pos, key_ok, first + n_k - n_q, scale, causal, window)
    key_idx = torch.arange(n_k, device=dev)
    start = first_valid_key(key_ok, dev)[:, None, None]
    sinks = (key_idx - start < sink) & (key_idx - start >= 0)
    cols_kept = keep_top(vertical, sinks.expand_as(vertical), nv, mass)
    offsets_kept = keep_top(slash, (key_idx < local).expand_as(slash), ns, mass)
    return cols_kept, offsets_kept


def vertical_slash_index(
    q, k, q_pos, k_pos, key_ok, n_vertical, n_slash, *, last_q: int, sink: int, local: int, scale: float,
    causal: bool, window: int, block_m: int, block_n: int, mass: float = 1.0,
) -> SparseIndex:  # fmt: skip
    """MInference's vertical-slash pattern (see the module notes); budgets per query head."""
    _check_blocks(block_m, block_n, "vertical_slash")
    cols_kept, offsets_kept = vertical_slash_selection(
        q, k, q_pos, k_pos, key_ok, n_vertical, n_slash, last_q=last_q, sink=sink, local=local, scale=scale,
        causal=causal, window=window, mass=mass,
    )  # fmt: skip
    n_columns = max(per_head_values(n_vertical, q.shape[1])) + sink
    return vertical_slash_lists(
        cols_kept, offsets_kept, q_pos, k_pos, key_ok, n_columns, causal=causal, window=window, block_m=block_m,
        block_n=block_n,
    )  # fmt: skip


def vertical_slash_lists(
    cols_kept, offsets_kept, q_pos, k_pos, key_ok, n_columns: int, *, causal: bool, window: int, block_m: int,
    block_n: int, q_shift=None,
) -> SparseIndex:  # fmt: skip
    """The block lists and single columns of kept columns and slash offsets ((B, Hq, Nk) bool, at
    most ``n_columns`` columns per head) for the queries at ``q_pos``; ``q_shift``: the key index
    of the first query (default Nk - Nq, queries last; a context-parallel rank's chunk start)."""
    b, hq, n_k = cols_kept.shape
    n_q, dev = q_pos.shape[-1], cols_kept.device
    shift = n_k - n_q if q_shift is None else q_shift
    # Offset o meets block (i, j) where j - i is floor((s - o) / b) or floor((s - o + b - 1) / b):
    # block diagonal t = j - i holds the offsets in [s - t b - b + 1, s - t b + b - 1]. It is selected
    # when that range holds a kept offset: a difference of prefix counts (no scatter).
    n_qb, n_kb = -(-n_q // block_m), -(-n_k // block_n)
    base = n_kb + 1  # t lies in [-(n_kb + 1), n_kb + 1]
    t = torch.arange(-base, base + 1, device=dev)
    lo = (shift - t * block_n - block_n + 1).clamp(0, n_k).expand(b, hq, -1)
    hi = (shift - t * block_n + block_n).clamp(0, n_k).expand(b, hq, -1)
    kept_before = torch.nn.functional.pad(torch.cumsum(offsets_kept, -1, dtype=torch.int32), (1, 0))
    rel_set = (kept_before.gather(-1, hi) > kept_before.gather(-1, lo)).to(torch.int8)
    # Pair (i, j) is selected when its block diagonal j - i is in rel_set: lists straight from it.
    limits = block_limits(q_pos, k_pos, key_ok, block_m, block_n)
    blocks = diagonal_block_lists(rel_set, *limits, base, causal, window)
    columns = _vertical_columns(cols_kept, n_columns, rel_set, base, n_qb, n_k, shift, block_m, block_n)
    return SparseIndex(*blocks, block_m, block_n, *columns)


def _vertical_columns(cols_kept, most, rel_set, base, n_qb, n_k, shift, block_m, block_n):
    """Per query block, the kept columns it may see (ascending, a prefix) with those inside one of
    its selected blocks (block diagonal in ``rel_set``) replaced by Nk (skipped by the kernel):
    (B, Hq, nQB, ``most``)."""
    width = max(1, most)
    ids, n_cols = compact(cols_kept, width)  # ascending kept columns; tail slots hold 0
    ids = torch.where(torch.arange(width, device=ids.device) < n_cols[..., None], ids, n_k)
    return diagonal_column_lists(ids, rel_set, base, n_qb, n_k, shift, block_m, block_n)


# ---- SampleAttention -------------------------------------------------------------------------------


def _ceil_ratio(ratio: float, n) -> int:
    """ceil(ratio * n) in exact integers, ``ratio`` read as the nearest fraction of denominator
    <= 2^16: a float ceil of a symbolic length makes sizes that Inductor's GPU codegen fails on
    (torch 2.11), and in floats 0.2 * 150 is 30.000000000000004."""
    frac = Fraction(ratio).limit_denominator(1 << 16)
    return -(-n * frac.numerator // frac.denominator)


def sampled_rows(n_q, sample_ratio: float, device) -> torch.Tensor:
    """SampleAttention's query rows: ``ceil(sample_ratio * Nq)`` of them, evenly spaced, the last
    row included."""
    if not 0 < sample_ratio <= 1:
        raise ValueError(f"sample_ratio={sample_ratio}: needs 0 < sample_ratio <= 1")
    # Plain integer sizes and arithmetic (no linspace, min or max of the length): under dynamic
    # shapes Dynamo would specialise on them or Inductor's GPU codegen fail (torch 2.11).
    n_rows = _ceil_ratio(sample_ratio, n_q)  # in [1, Nq]
    back = torch.arange(n_rows, device=device).flip(0)
    return n_q - 1 - back * n_q // n_rows


def sample_index(
    q, k, q_pos, k_pos, key_ok, alpha, *, window_ratio: float, sample_ratio: float, scale: float,
    causal: bool, window: int, block_m: int, block_n: int, score: torch.Tensor | None = None,
) -> SparseIndex:  # fmt: skip
    """SampleAttention's pattern (see the module notes); ``alpha`` per query head. ``score``: the
    sampled rows' column mass (B, Hq, Nk) if already computed (a context-parallel rank gathers it)."""
    _check_blocks(block_m, block_n, "sample")
    b, hq, n_q, _ = q.shape
    n_k, dev = k.shape[2], q.device
    alphas = _head_limits(per_head_values(alpha, hq), dev, trailing=1)
    if score is None:
        rows = sampled_rows(n_q, sample_ratio, dev)
        score = column_mass(q[:, :, rows], k, q_pos[:, rows], k_pos, key_ok, scale, causal, window)
    # Fewest top columns reaching alpha of the total: sort descending, keep while the mass before
    # a column is still short of alpha.
    ordered, order = score.sort(-1, descending=True)
    before, total = _mass_before(ordered)
    take = (before < alphas * total) & (ordered > 0)
    cols_kept = torch.zeros_like(take).scatter_(-1, order, take)
    # Local band of whole blocks: rel = j - i from floor((s - w) / b) up to the diagonal.
    shift = n_k - n_q
    w = _ceil_ratio(window_ratio, n_k)
    n_qb, n_kb = -(-n_q // block_m), -(-n_k // block_n)
    rel_lo = (shift - w) // block_n
    rel_hi = (shift + block_m - 1) // block_n
    rel = torch.arange(n_kb, device=dev)[None, :] - torch.arange(n_qb, device=dev)[:, None]
    selected = ((rel >= rel_lo) & (rel <= rel_hi))[None, None].expand(b, hq, n_qb, n_kb)
    # Columns left of each row's band: one ascending list per head, a prefix per query block.
    width = max(1, n_k)
    ids, n_cols = compact(cols_kept, width)
    ids = torch.where(torch.arange(width, device=dev) < n_cols[..., None], ids, n_k)
    band_start = ((torch.arange(n_qb, device=dev) + rel_lo) * block_n).clamp(0, n_k)
    # Kept columns before each band start, from a prefix count (torch.searchsorted here failed in
    # torch 2.11's Inductor GPU codegen inside a compiled model: a loop-carried type mismatch).
    kept_before = torch.nn.functional.pad(torch.cumsum(cols_kept, -1, dtype=torch.int32), (1, 0))
    count = kept_before.gather(-1, band_start[None, None, :].expand(b, hq, n_qb))
    columns = (ids[:, :, None, :].contiguous(), count.to(torch.int32))
    return index_from_selection(
        selected, q_pos, k_pos, key_ok, causal=causal, window=window, block_m=block_m, block_n=block_n,
        columns=columns,
    )  # fmt: skip


# ---- block top-k -----------------------------------------------------------------------------------


def _pool_blocks(x: torch.Tensor, ok: torch.Tensor | None, block: int, how: str):
    """Per block of ``block`` rows along dim 2 of x (B, H, N, D): mean over existing rows, or
    (min, max) for ``how="minmax"``; rows past N and padded rows are left out. The mean reads x
    once in its own dtype (fp32 sums): no fp32 copy of Q or K."""
    b, h, n, d = x.shape
    n_blocks = -(-n // block)
    tail = n_blocks * block - n
    exists = torch.arange(n_blocks * block, device=x.device) < n
    exists = exists[None, :] if ok is None else exists[None, :] & torch.nn.functional.pad(ok, (0, tail))
    xb = (torch.nn.functional.pad(x, (0, 0, 0, tail)) if tail else x).view(b, h, n_blocks, block, d)
    e = exists.view(-1, 1, n_blocks, block)
    if how == "minmax":
        e5 = e[..., None]
        lo = xb.float().masked_fill(~e5, float("inf")).amin(3)
        hi = xb.float().masked_fill(~e5, float("-inf")).amax(3)
        return lo.nan_to_num(0.0, posinf=0.0, neginf=0.0), hi.nan_to_num(0.0, posinf=0.0, neginf=0.0)
    if ok is None and not tail:
        sums = xb.sum(3, dtype=torch.float32)
    else:  # weighted by existence: one (1 x block) @ (block x D) product per block
        sums = (e.to(x.dtype)[..., None, :] @ xb).squeeze(-2).float()
    return sums / e.sum(-1, keepdim=True).clamp_min(1)


def pooled_keys(k, key_ok, pool: str, block_n: int):
    """K pooled per key block as block top-k scores it: the mean, or (min, max) for "minmax"."""
    if pool not in ("mean", "minmax"):
        raise ValueError(f"block_topk pool={pool!r}; supported: 'mean', 'minmax'")
    return _pool_blocks(k, key_ok, block_n, pool)


def block_topk_index(
    q, k, q_pos, k_pos, key_ok, top_k, *, coverage: float, pool: str, scale: float, causal: bool, window: int,
    block_m: int, block_n: int, pooled=None, q_shift=None,
) -> SparseIndex:  # fmt: skip
    """Block top-k (see the module notes); ``top_k`` per query head (ignored when coverage > 0).
    ``pooled``: ``pooled_keys`` of all of K, given (a context-parallel rank gathers it), then ``k``
    is not read; ``q_shift``: the key index of the first query (default Nk - Nq, queries last)."""
    if pooled is None:
        pooled = pooled_keys(k, key_ok, pool, block_n)
    elif pool not in ("mean", "minmax"):
        raise ValueError(f"block_topk pool={pool!r}; supported: 'mean', 'minmax'")
    b, hq, n_q, d = q.shape
    hkv, n_k, dev = (pooled[0] if pool == "minmax" else pooled).shape[1], k_pos.shape[-1], q.device
    q_shift = n_k - n_q if q_shift is None else q_shift
    g = hq // hkv
    kk = per_head_values(top_k, hq)
    some, _ = _structure(q_pos, k_pos, key_ok, causal=causal, window=window, block_m=block_m, block_n=block_n)
    some = some.expand(b, hq, *some.shape[2:])
    n_qb, n_kb = some.shape[2], some.shape[3]
    q_mean = _pool_blocks(q, None, block_m, "mean").view(b, hkv, g, n_qb, d)
    if pool == "minmax":
        # sum_d max(q_d lo_d, q_d hi_d) = relu(q) . hi + min(q, 0) . lo: two products, no (.., D) blow-up
        k_lo, k_hi = pooled
        pos, neg = q_mean.clamp_min(0), q_mean.clamp_max(0)
        score = pos @ k_hi[:, :, None].transpose(-1, -2) + neg @ k_lo[:, :, None].transpose(-1, -2)
        score = score.view(b, hq, n_qb, n_kb)
    else:
        k_mean = pooled
        score = (q_mean @ k_mean[:, :, None].transpose(-1, -2)).view(b, hq, n_qb, n_kb)
    score = (score * scale).masked_fill(~some, float("-inf"))
    # Forced: the first visible block and the diagonal blocks (holding keys at the query block's
    # own indices i * BM + s onwards).
    col = torch.arange(n_kb, device=dev)
    first = torch.where(some, col, n_kb).amin(-1, keepdim=True)
    diag_from = ((torch.arange(n_qb, device=dev) * block_m + q_shift) // block_n)[:, None]
    forced = some & ((col == first) | (col >= diag_from))
    score = score.masked_fill(forced, float("-inf"))
    if coverage > 0:
        prob = torch.softmax(score, -1).nan_to_num(0.0)
        ordered, order = prob.sort(-1, descending=True)
        take = (_mass_before(ordered)[0] < coverage) & (ordered > 0)
        chosen = torch.zeros_like(take).scatter_(-1, order, take)
    else:
        kmax = max(1, min(max(kk), n_kb))
        top = score.topk(kmax, dim=-1)
        per_head = _head_limits(kk, dev, trailing=2)
        rank_ok = (torch.arange(kmax, device=dev)[None, None, None, :] < per_head) & torch.isfinite(top.values)
        chosen = torch.zeros_like(some).scatter_(-1, top.indices, rank_ok)
    selected = forced | (chosen & some)
    return index_from_selection(
        selected, q_pos, k_pos, key_ok, causal=causal, window=window, block_m=block_m, block_n=block_n
    )


# ---- several rules in one site ---------------------------------------------------------------------


def _pad_last(t: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, width - t.shape[-1]))


def combine_head_indexes(parts: list, heads: list[tuple[int, ...]], hq: int) -> SparseIndex:
    """One index for all ``hq`` query heads from per-rule indexes: ``parts[i]`` covers the query
    heads ``heads[i]`` (its head dim is len(heads[i]), 1 when shared, or hq: built for every head,
    the group's heads are taken). Lists are padded to the longest (counts unchanged); heads without
    columns get none. The parts must have the same block sizes."""
    block_m, block_n = parts[0].block_m, parts[0].block_n
    if any((p.block_m, p.block_n) != (block_m, block_n) for p in parts):
        sizes = [(p.block_m, p.block_n) for p in parts]
        raise ValueError(f"indexes of different block sizes (block_m, block_n) {sizes} cannot be combined")
    b = max(p.full_count.shape[0] for p in parts)
    n_qb = parts[0].full_count.shape[2]
    width = max(p.full_blocks.shape[-1] for p in parts)
    with_cols = [p for p in parts if p.columns is not None]
    n_cols = max((p.columns.shape[-1] for p in with_cols), default=0)
    col_rows = 1 if all(p.columns.shape[2] == 1 for p in with_cols) else n_qb
    dev = parts[0].full_count.device
    lists = [torch.zeros(b, hq, n_qb, width, dtype=torch.int32, device=dev) for _ in range(2)]
    counts = [torch.zeros(b, hq, n_qb, dtype=torch.int32, device=dev) for _ in range(3)]
    columns = torch.full((b, hq, col_rows, max(1, n_cols)), 0, dtype=torch.int32, device=dev)
    for part, head_ids in zip(parts, heads, strict=True):
        h = torch.tensor(head_ids, device=dev)
        n_h = len(head_ids)
        if part.full_count.shape[1] == hq and n_h != hq:  # built for every head: take the group's
            part = SparseIndex(*(t[:, h] if isinstance(t, torch.Tensor) else t for t in part))
        lists[0][:, h] = _pad_last(part.full_blocks, width).expand(b, n_h, n_qb, width)
        lists[1][:, h] = _pad_last(part.part_blocks, width).expand(b, n_h, n_qb, width)
        counts[0][:, h] = part.full_count.expand(b, n_h, n_qb)
        counts[1][:, h] = part.part_count.expand(b, n_h, n_qb)
        if part.columns is not None:
            cols = _pad_last(part.columns, max(1, n_cols))
            columns[:, h] = cols.expand(b, n_h, col_rows, cols.shape[-1])
            counts[2][:, h] = part.column_count.expand(b, n_h, n_qb)
    if not with_cols:
        return SparseIndex(lists[0], counts[0], lists[1], counts[1], block_m, block_n)
    return SparseIndex(lists[0], counts[0], lists[1], counts[1], block_m, block_n, columns, counts[2])
