"""Column mass: how much attention a few query rows give each key, without an R x Nk score matrix.

Notation as in ``block_sparse_attention.py``: q_rows (B, Hq, R, D) are some query rows (their
positions ``row_pos`` (B', R)), k (B, Hkv, Nk, D) all keys, query head h reads KV head h // (Hq / Hkv).
    p[r, j] = softmax over the keys j that row r may see (structure mask: causal, window, padding)
    mass[b, h, j] = sum_r p[r, j]        (B, Hq, Nk), fp32; rows that see no key add nothing.
SampleAttention's column scores and vertical-slash's vertical scores are this sum; vertical-slash's
slash scores sum the same p along diagonals (``column_slash_mass``; rows consecutive: a tile's
diagonals are summed in registers, a rotation per row, then added with 2 * BLOCK_N atomics).

Two Triton passes (the softmax of a row needs all its keys before any column can be credited):
    1. one program per (row tile, head, key split) walks its keys: the partial log2 sum_j 2^(s2[r, j])
       with s2 = scale * log2(e) * q . k (online max, as in the attention kernel); the splits'
       partials combine into lse2[r] (splits keep the GPU busy when there are few rows);
    2. one program per (key tile, head) walks the rows: mass[j] = sum_r 2^(s2[r, j] - lse2[r]).
Tiles where no pair can pass a causal or window mask are skipped (positions decide, not indices).
Each pass reads Q_rows and K once per tile pair: 2 * 2 * R * Nk * D FLOPs per head in all.

Beside them the PyTorch reference (chunked over rows, memory O(chunk * Nk)): the op off CUDA and
the tests' oracle.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .block_sparse_attention import LOG2E, _batch_stride, structure_pairs

_SCORE_ELEMENTS = 1 << 27  # fp32 scores the reference holds at once (512 MiB)


# fmt: off
@triton.jit
def _scores(q, k, q_pos, k_pos, ok, valid_m, valid_n, scale2, window,
            CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr):
    """Base-2 scores of a (rows, keys) tile with -inf where the structure drops the pair."""
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    keep = valid_m[:, None] & valid_n[None, :] & ok[None, :]
    dist = q_pos[:, None] - k_pos[None, :]
    if CAUSAL:
        keep = keep & (dist >= 0)
    if HAS_WINDOW:
        keep = keep & (dist < window)
    return tl.where(keep, s * scale2, float("-inf"))


@triton.jit
def _may_meet(q_lo, q_hi, k_lo, k_hi, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Whether some row position in [q_lo, q_hi] may see some key position in [k_lo, k_hi]."""
    meet = True
    if CAUSAL:
        meet = k_lo <= q_hi
    if HAS_WINDOW:
        meet = meet & (q_lo - k_hi < window)
    return meet


@triton.jit
def _load_rows(Q, QPos, b, h, m0, n_rows, stride_qb, stride_qh, stride_qm, stride_qd, stride_qpb,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    valid = offs_m < n_rows
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=valid[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    pos = tl.load(QPos + b * stride_qpb + offs_m, mask=valid, other=0)
    return q, pos, offs_m, valid


@triton.jit
def _load_keys(K, KPos, KeyOk, b, kvh, n0, n_k, stride_kb, stride_kh, stride_kn, stride_kd, stride_kpb,
               stride_kob, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
               HAS_KEY_OK: tl.constexpr):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    valid = offs_n < n_k
    k = tl.load(K + b * stride_kb + kvh * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=valid[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    pos = tl.load(KPos + b * stride_kpb + offs_n, mask=valid, other=0)
    if HAS_KEY_OK:
        ok = tl.load(KeyOk + b * stride_kob + offs_n, mask=valid, other=0) != 0
    else:
        ok = valid
    return k, pos, ok, offs_n, valid


@triton.jit
def _credit_diagonals(p, SlashRow, first_offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Add a (rows, keys) tile of p to the slash sums: pair (r, c) lies on diagonal
    first_offset + r - c (consecutive rows and keys). Row r is rotated left by r, so column c' holds
    diagonal first_offset - c' (where c' + r < BLOCK_N) or first_offset - c' + BLOCK_N (where it
    wrapped): two sums over the rows and 2 * BLOCK_N atomics instead of one per pair."""
    r = tl.arange(0, BLOCK_M)[:, None]
    c = tl.arange(0, BLOCK_N)[None, :]
    rotated = tl.gather(p, (c + r) % BLOCK_N, 1)
    wrapped = (c + r) >= BLOCK_N
    straight = tl.sum(tl.where(wrapped, 0.0, rotated), 0)
    wrapped_sum = tl.sum(tl.where(wrapped, rotated, 0.0), 0)
    diag = first_offset - tl.arange(0, BLOCK_N)
    tl.atomic_add(SlashRow + diag, straight, mask=(straight > 0.0) & (diag >= 0), sem="relaxed")
    tl.atomic_add(SlashRow + diag + BLOCK_N, wrapped_sum, mask=(wrapped_sum > 0.0) & (diag + BLOCK_N >= 0),
                  sem="relaxed")


@triton.jit
def _row_lse_kernel(
    Q, K, QPos, KPos, KeyOk, Lse, Slash,  # Slash unread
    stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    stride_qpb, stride_kpb, stride_kob,
    n_heads, n_rows, n_k, groups, scale2, window, split_len, first_row,  # first_row unread
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KEY_OK: tl.constexpr, IEEE: tl.constexpr,
    SLASH: tl.constexpr,
):
    """Partial log2-sum-exp2 of a row tile over one split of the keys (-inf where it keeps none)."""
    scale2 = tl.cast(scale2, tl.float32)
    pid_bh = tl.program_id(1).to(tl.int64)  # batch x head offsets pass 2^31 elements on long inputs
    split = tl.program_id(2)
    b, h = pid_bh // n_heads, pid_bh % n_heads
    q, q_pos, offs_m, valid_m = _load_rows(Q, QPos, b, h, tl.program_id(0) * BLOCK_M, n_rows, stride_qb,
                                           stride_qh, stride_qm, stride_qd, stride_qpb, HEAD_DIM, BLOCK_D, BLOCK_M)
    q_lo = tl.min(tl.where(valid_m, q_pos, 2147483647))
    q_hi = tl.max(tl.where(valid_m, q_pos, -2147483647))
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(split * split_len, tl.minimum(n_k, (split + 1) * split_len), BLOCK_N):
        k, k_pos, ok, offs_n, valid_n = _load_keys(K, KPos, KeyOk, b, h // groups, n0, n_k, stride_kb, stride_kh,
                                                   stride_kn, stride_kd, stride_kpb, stride_kob, HEAD_DIM,
                                                   BLOCK_D, BLOCK_N, HAS_KEY_OK)
        k_lo = tl.min(tl.where(valid_n, k_pos, 2147483647))
        k_hi = tl.max(tl.where(valid_n, k_pos, -2147483647))
        if _may_meet(q_lo, q_hi, k_lo, k_hi, window, CAUSAL, HAS_WINDOW):
            s = _scores(q, k, q_pos, k_pos, ok, valid_m, valid_n, scale2, window, CAUSAL, HAS_WINDOW, IEEE)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.math.exp2(m_i - m_use) + tl.sum(tl.math.exp2(s - m_use[:, None]), 1)
            m_i = m_new
    lse = tl.where(l_i > 0.0, m_i + tl.math.log2(tl.maximum(l_i, 1e-30)), float("-inf"))
    tl.store(Lse + (pid_bh * tl.num_programs(2) + split) * n_rows + offs_m, lse, mask=valid_m)


@triton.jit
def _column_mass_kernel(
    Q, K, QPos, KPos, KeyOk, Lse, Mass, Slash,
    stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    stride_qpb, stride_kpb, stride_kob,
    n_heads, n_rows, n_k, groups, scale2, window, split_len, first_row,  # split_len unread
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KEY_OK: tl.constexpr, IEEE: tl.constexpr,
    SLASH: tl.constexpr,
):
    """Column (and slash) sums of p over the rows for one key tile and every query head of one KV
    head: the tile is loaded once for the group (GQA)."""
    scale2 = tl.cast(scale2, tl.float32)
    n_kv = n_heads // groups
    pid_bh = tl.program_id(1).to(tl.int64)
    b, kvh = pid_bh // n_kv, pid_bh % n_kv
    k, k_pos, ok, offs_n, valid_n = _load_keys(K, KPos, KeyOk, b, kvh, tl.program_id(0) * BLOCK_N, n_k,
                                               stride_kb, stride_kh, stride_kn, stride_kd, stride_kpb, stride_kob,
                                               HEAD_DIM, BLOCK_D, BLOCK_N, HAS_KEY_OK)
    k_lo = tl.min(tl.where(valid_n, k_pos, 2147483647))
    k_hi = tl.max(tl.where(valid_n, k_pos, -2147483647))
    for g in range(0, groups):
        pid_bh = b * n_heads + kvh * groups + g
        mass = tl.zeros([BLOCK_N], dtype=tl.float32)
        for m0 in range(0, n_rows, BLOCK_M):
            q, q_pos, offs_m, valid_m = _load_rows(Q, QPos, b, kvh * groups + g, m0, n_rows, stride_qb, stride_qh,
                                                   stride_qm, stride_qd, stride_qpb, HEAD_DIM, BLOCK_D, BLOCK_M)
            q_lo = tl.min(tl.where(valid_m, q_pos, 2147483647))
            q_hi = tl.max(tl.where(valid_m, q_pos, -2147483647))
            if _may_meet(q_lo, q_hi, k_lo, k_hi, window, CAUSAL, HAS_WINDOW):
                s = _scores(q, k, q_pos, k_pos, ok, valid_m, valid_n, scale2, window, CAUSAL, HAS_WINDOW, IEEE)
                lse = tl.load(Lse + pid_bh * n_rows + offs_m, mask=valid_m, other=float("inf"))
                p = tl.math.exp2(s - lse[:, None])
                mass += tl.sum(p, 0)
                if SLASH:
                    _credit_diagonals(p, Slash + pid_bh * n_k, first_row + m0 - tl.program_id(0) * BLOCK_N,
                                      BLOCK_M, BLOCK_N)
        tl.store(Mass + pid_bh * n_k + offs_n, mass, mask=valid_n)
# fmt: on


def _default_splits(n_rows: int, n_k: int, programs: int, block_m: int, block_n: int, device) -> int:
    """Key splits of the first pass: enough programs for about four waves on the GPU."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    want = -(-4 * sms // max(1, programs * triton.cdiv(n_rows, block_m)))
    return max(1, min(want, triton.cdiv(n_k, block_n)))


def column_mass_triton(
    q_rows, k, row_pos, k_pos, key_ok, scale: float, causal: bool, window: int, first_row: int | None = None, *,
    block_m: int = 64, block_n: int = 128, num_warps: int = 4, splits: int = 0,
):  # fmt: skip
    """Launch both passes; returns the (B, Hq, Nk) fp32 column mass, and with ``first_row`` (the key
    index of the first row; the rows are consecutive) also the slash mass (see ``column_slash_mass``).
    The first pass splits the keys into ``splits`` ranges (0: enough to fill the GPU) whose partial
    sums are combined here."""
    b, hq, n_rows, d = q_rows.shape
    hkv, n_k = k.shape[1], k.shape[2]
    if first_row is not None and block_m > block_n:
        raise ValueError(
            f"slash mass needs block_m <= block_n (a row tile's diagonals span one rotation); got {block_m} > {block_n}"
        )
    row_pos, k_pos = row_pos.contiguous(), k_pos.contiguous()
    key_ok = key_ok.contiguous() if key_ok is not None else None
    splits = splits or _default_splits(n_rows, n_k, b * hq, block_m, block_n, q_rows.device)
    split_len = triton.cdiv(triton.cdiv(n_k, splits), block_n) * block_n
    splits = triton.cdiv(n_k, split_len)
    partial = torch.empty(b, hq, splits, n_rows, dtype=torch.float32, device=q_rows.device)
    mass = torch.empty(b, hq, n_k, dtype=torch.float32, device=q_rows.device)
    slash = torch.zeros_like(mass) if first_row is not None else mass  # unread without first_row
    block_d = max(16, triton.next_power_of_2(d))
    ok_arg = key_ok.view(torch.uint8) if key_ok is not None else k_pos  # unread without padding
    common = (
        *q_rows.stride(),
        *k.stride(),
        _batch_stride(row_pos),
        _batch_stride(k_pos),
        _batch_stride(key_ok) if key_ok is not None else 0,
        hq,
        n_rows,
        n_k,
        hq // hkv,
        scale * LOG2E,
        window,
        split_len,
        first_row or 0,
    )
    flags = dict(
        HEAD_DIM=d,
        BLOCK_D=block_d,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        CAUSAL=causal,
        HAS_WINDOW=window > 0,
        HAS_KEY_OK=key_ok is not None,
        IEEE=q_rows.dtype == torch.float32,
        SLASH=slash is not mass,
        num_warps=num_warps,
    )
    inputs = (q_rows, k, row_pos, k_pos, ok_arg)
    _row_lse_kernel[(triton.cdiv(n_rows, block_m), b * hq, splits)](*inputs, partial, slash, *common, **flags)
    # log2 sum over the splits; a row that sees no key gets +inf (2^(s - inf) = 0 credits nothing)
    lse = torch.logsumexp(partial * math.log(2), dim=2) / math.log(2)
    lse = lse.masked_fill(lse == float("-inf"), float("inf"))
    _column_mass_kernel[(triton.cdiv(n_k, block_n), b * hkv)](*inputs, lse, mass, slash, *common, **flags)
    return (mass, slash) if slash is not mass else mass


def row_attention(q_rows, k, row_pos, k_pos, key_ok, *, scale, causal, window):
    """Softmax attention (fp32) of some query rows (B, Hq, R, D) over all keys: (B, Hq, R, Nk),
    rows that see no key give zeros. GQA without copying K: query heads grouped per KV head."""
    b, hq, r, d = q_rows.shape
    hkv, n_k = k.shape[1], k.shape[2]
    g = hq // hkv
    # products in the inputs' dtype (fp32 accumulation), softmax in fp32: an estimate, no K copy
    s = (q_rows.reshape(b, hkv, g, r, d) @ k[:, :, None].transpose(-1, -2)).float()
    s = s.view(b, hq, r, n_k) * scale
    allowed = structure_pairs(row_pos, k_pos, key_ok, causal=causal, window=window)
    return torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)


def column_mass_reference(q_rows, k, row_pos, k_pos, key_ok, scale, causal, window, first_row=None):
    """Plain PyTorch column (and with ``first_row`` slash) mass, chunked over rows."""
    b, hq, n_rows, _ = q_rows.shape
    n_k = k.shape[2]
    mass = torch.zeros(b, hq, n_k, dtype=torch.float32, device=q_rows.device)
    slash = torch.zeros_like(mass)
    step = max(1, min(n_rows, _SCORE_ELEMENTS // max(1, b * hq * n_k)))
    for r0 in range(0, n_rows, step):
        rows = slice(r0, r0 + step)
        attn = row_attention(q_rows[:, :, rows], k, row_pos[:, rows], k_pos, key_ok, scale=scale, causal=causal,
                             window=window)  # fmt: skip
        mass += attn.sum(2)
        if first_row is not None:
            row_index = torch.arange(first_row + r0, first_row + min(n_rows, r0 + step), device=k.device)
            offset = row_index[:, None] - torch.arange(n_k, device=k.device)[None, :]
            attn = attn.masked_fill(offset < 0, 0.0)  # pairs above the diagonal belong to no slash
            idx = offset.clamp_min(0).reshape(1, 1, -1).expand(b, hq, -1)
            slash.scatter_add_(-1, idx, attn.reshape(b, hq, -1))
    return (mass, slash) if first_row is not None else mass


@torch.library.custom_op("sparsecomp::column_mass", mutates_args=())
def column_mass(
    q_rows: torch.Tensor,
    k: torch.Tensor,
    row_pos: torch.Tensor,
    k_pos: torch.Tensor,
    key_ok: torch.Tensor | None,
    scale: float,
    causal: bool,
    window: int,
) -> torch.Tensor:
    """Attention mass per key summed over the given rows (see the notation above): the Triton
    passes on CUDA, the reference elsewhere."""
    if q_rows.is_cuda:
        return column_mass_triton(q_rows, k, row_pos, k_pos, key_ok, scale, causal, window)
    return column_mass_reference(q_rows, k, row_pos, k_pos, key_ok, scale, causal, window)


@column_mass.register_fake
def _column_mass_fake(q_rows, k, row_pos, k_pos, key_ok, scale, causal, window):
    return q_rows.new_empty(q_rows.shape[0], q_rows.shape[1], k.shape[2], dtype=torch.float32)


@torch.library.custom_op("sparsecomp::column_slash_mass", mutates_args=())
def column_slash_mass(
    q_rows: torch.Tensor,
    k: torch.Tensor,
    row_pos: torch.Tensor,
    k_pos: torch.Tensor,
    key_ok: torch.Tensor | None,
    first_row: int,
    scale: float,
    causal: bool,
    window: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Column mass and slash mass of consecutive rows whose key indices are ``first_row`` onwards:
    slash[b, h, o] = sum of p[r, j] over the pairs on diagonal o = first_row + r - j >= 0.
    Vertical-slash's two scores (its last rows).
    On CUDA the slash sum uses float atomics: its last bits vary from run to run."""
    if q_rows.is_cuda:
        # 64-key tiles: the rotation is cheaper on narrower tiles (H100, 64 rows x 128K keys: 1.69 ms
        # for both passes vs 1.94 ms with 128-key tiles)
        return column_mass_triton(q_rows, k, row_pos, k_pos, key_ok, scale, causal, window, first_row, block_n=64)
    return column_mass_reference(q_rows, k, row_pos, k_pos, key_ok, scale, causal, window, first_row)


@column_slash_mass.register_fake
def _column_slash_mass_fake(q_rows, k, row_pos, k_pos, key_ok, first_row, scale, causal, window):
    shape = (q_rows.shape[0], q_rows.shape[1], k.shape[2])
    return q_rows.new_empty(shape, dtype=torch.float32), q_rows.new_empty(shape, dtype=torch.float32)
