"""Decode attention over a selected-token list: split-K (flash-decoding), GQA-native.

Notation:
    q (B, Hq, Nq, D): a few query rows (a decode step; Nq = 1 usually); k / v (B, Hkv, Nk, D).
    tokens (B, Hs, S) int32: per selection head the key indices to attend to, a fixed-size list (so a
        decode step is CUDA-graph capturable); Hs = Hkv (a KV group shares one selection: its query
        heads read each selected K/V row once) or Hs = Hq (one selection per query head), or any
        multiple of Hkv dividing Hq. Selection head hs serves query heads hs*G .. hs*G + G-1 (G = Hq/Hs)
        and reads KV head hs // (Hs/Hkv).
    q_last (B,) int32: the cache index of the last query row; row i (of Nq) sees keys <= q_last - (Nq-1-i).
    key_ok (B, Nk) bool or None: padding (left-padded batches).
    A listed token t is kept for row i if 0 <= t < Nk, it passes key_ok and the causal rule above.
    Tokens may repeat only if the caller wants them counted twice; selections never list one twice.
    out[i] = softmax over the kept tokens of scale * q[i] . k[t], applied to v[t]; a row that keeps
    nothing gives zeros.

One program = one selection head of one batch row and one split of its S slots (split-K: the work
of a long list spread over the GPU even at batch 1). Its G * Nq query rows form the M side of the
tile (padded to 16 for tl.dot), so each gathered K/V row is read once for the whole group. Per split
the fp32 partials (row max m, row sum l, unnormalized acc) are written, and a second kernel combines
them:  m* = max_s m_s;  out = sum_s 2^(m_s - m*) acc_s / sum_s 2^(m_s - m*) l_s.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = math.log2(math.e)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# fmt: off
@triton.jit
def selection_rows(Q, pid_bh, sqb, sqh, sqn, sqc, n_q, n_sel, group, sel_per_kv, n_cols,
                   BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """The query rows of selection head ``pid_bh % n_sel`` of batch row ``pid_bh // n_sel`` as a
    (BLOCK_M, BLOCK_C) tile (row r: query head hs*group + r // n_q, query row r % n_q; padded rows
    and columns are zeros); returns (b, kv head, query row, row valid, tile)."""
    b = (pid_bh // n_sel).to(tl.int64)  # b * batch stride passes 2^31 elements on long caches
    hs = pid_bh % n_sel
    offs_m = tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_C)
    row_ok = offs_m < group * n_q
    head = hs * group + offs_m // n_q
    qrow = offs_m % n_q
    q = tl.load(Q + b * sqb + head[:, None] * sqh + qrow[:, None] * sqn + offs_c[None, :] * sqc,
                mask=row_ok[:, None] & (offs_c < n_cols)[None, :], other=0.0)
    return b, hs // sel_per_kv, qrow, row_ok, q


@triton.jit
def _decode_split(
    Q, K, V, Tokens, QLast, KeyOk, MPart, LPart, AccPart,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, stb, sth, sts, s_last,
    n_slots, split_size, n_splits, n_keys, n_q, n_sel, group, sel_per_kv, scale2, softcap,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_KEY_OK: tl.constexpr, HAS_SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, kvh, qrow, row_ok, q = selection_rows(Q, pid_bh, sqb, sqh, sqn, sqd, n_q, n_sel, group, sel_per_kv,
                                             HEAD_DIM, BLOCK_M, BLOCK_D)
    hs = pid_bh % n_sel
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    # row i of Nq sees keys up to q_last - (Nq - 1 - i)
    limit = tl.load(QLast + b * s_last) - (n_q - 1 - qrow)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    start = pid_s * split_size
    end = tl.minimum(start + split_size, n_slots)
    for s0 in range(start, end, BLOCK_N):
        offs_n = s0 + tl.arange(0, BLOCK_N)
        listed = offs_n < end
        tok = tl.load(Tokens + b * stb + hs * sth + offs_n * sts, mask=listed, other=-1)
        valid = listed & (tok >= 0) & (tok < n_keys)
        if HAS_KEY_OK:
            valid &= tl.load(KeyOk + b * n_keys + tok, mask=valid, other=0) != 0
        tok = tl.where(valid, tok, 0)
        row = tok.to(tl.int64)  # token x row stride passes 2^31 elements past 16M keys
        d_ok = (offs_d < HEAD_DIM)[None, :]
        k = tl.load(K + b * skb + kvh * skh + row[:, None] * skn + offs_d[None, :] * skd,
                    mask=valid[:, None] & d_ok, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        if HAS_SOFTCAP:
            x = s * (scale2 / 1.4426950408889634) / softcap
            s = softcap * (2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0) * 1.4426950408889634
        else:
            s = s * scale2
        keep = valid[None, :] & (tok[None, :] <= limit[:, None]) & row_ok[:, None]
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing kept yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + b * svb + kvh * svh + row[:, None] * svn + offs_d[None, :] * svd,
                    mask=valid[:, None] & d_ok, other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    part = pid_bh * n_splits + pid_s
    tl.store(MPart + part * BLOCK_M + offs_m, m_i)
    tl.store(LPart + part * BLOCK_M + offs_m, l_i)
    tl.store(AccPart + (part * BLOCK_M + offs_m[:, None]) * BLOCK_D + offs_d[None, :], acc)


@triton.jit
def _decode_combine(
    MPart, LPart, AccPart, Out, sob, soh, son, sod, n_splits, n_q, n_sel, group,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """One program = one query row of one selection head: the splits' partials into the output."""
    pid_bh = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1)  # row of the head's tile: head hs*group + r // n_q, query row r % n_q
    b = pid_bh // n_sel
    hs = pid_bh % n_sel
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < n_splits
    part = pid_bh * n_splits + offs_s
    m = tl.load(MPart + part * BLOCK_M + r, mask=s_ok, other=float("-inf"))
    l_s = tl.load(LPart + part * BLOCK_M + r, mask=s_ok, other=0.0)
    acc = tl.load(AccPart + (part[:, None] * BLOCK_M + r) * BLOCK_D + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    m_all = tl.max(m, 0)
    m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
    w = tl.where(s_ok, tl.exp2(m - m_all), 0.0)
    denom = tl.sum(l_s * w, 0)
    num = tl.sum(acc * w[:, None], 0)
    o = tl.where(denom > 0, num / tl.where(denom > 0, denom, 1.0), 0.0)
    head = hs * group + r // n_q
    row = r % n_q
    tl.store(Out + b * sob + head * soh + row * son + offs_d * sod, o.to(Out.dtype.element_ty), mask=offs_d < HEAD_DIM)
# fmt: on


def split_plan(n_slots: int, programs: int, block_n: int, target: int) -> tuple[int, int]:
    """(split size, splits): enough splits that ``programs`` x splits fills about ``target``
    programs (the GPU's SMs times a few), each split a multiple of the key tile."""
    want = max(1, min(triton.cdiv(n_slots, block_n), triton.cdiv(target, max(1, programs))))
    size = triton.cdiv(triton.cdiv(n_slots, want), block_n) * block_n
    return size, triton.cdiv(n_slots, size)


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def check_decode_inputs(q, k, v, tokens, q_last, key_ok) -> None:
    """ValueError with the actual shapes unless the inputs follow the notation above."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be (B={b}, Hkv, Nk, D={d})")
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"dtypes q={q.dtype} k={k.dtype} v={v.dtype}; supported: {SUPPORTED_DTYPES}")
    if tokens.dim() != 3 or tokens.shape[0] != b or tokens.dtype != torch.int32:
        raise ValueError(f"tokens must be int32 (B={b}, Hs, S); got {tokens.dtype} {tuple(tokens.shape)}")
    hs = tokens.shape[1]
    if hq % hs or hs % hkv:
        raise ValueError(f"selection heads {hs} must divide query heads {hq} and be a multiple of KV heads {hkv}")
    if q_last.shape != (b,) or q_last.dtype != torch.int32:
        raise ValueError(f"q_last must be int32 (B={b},); got {q_last.dtype} {tuple(q_last.shape)}")
    if key_ok is not None and (key_ok.shape != (b, nk) or key_ok.dtype != torch.bool):
        raise ValueError(f"key_ok must be bool (B={b}, Nk={nk}); got {key_ok.dtype} {tuple(key_ok.shape)}")


def sparse_decode_triton(q, k, v, tokens, q_last, key_ok, scale: float, softcap: float = 0.0,
                         block_n: int = 64, num_warps: int = 4, out=None) -> torch.Tensor:  # fmt: skip
    """Launch the split kernel and the combine. ``out`` lets tests pass a poisoned buffer."""
    check_decode_inputs(q, k, v, tokens, q_last, key_ok)
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    hs, n_slots = tokens.shape[1], tokens.shape[2]
    group = hq // hs
    block_m = max(16, triton.next_power_of_2(group * nq))
    block_d = max(16, triton.next_power_of_2(d))
    size, splits = split_plan(max(1, n_slots), b * hs, block_n, _target_programs(q.device))
    f32 = dict(dtype=torch.float32, device=q.device)
    m_part = torch.empty(b * hs * splits * block_m, **f32)
    l_part = torch.empty(b * hs * splits * block_m, **f32)
    acc_part = torch.empty(b * hs * splits * block_m * block_d, **f32)
    if out is None:
        out = torch.empty(b, hq, nq, d, dtype=q.dtype, device=q.device)
    tokens, q_last = tokens.contiguous(), q_last.contiguous()
    key_ok = key_ok.contiguous().view(torch.uint8) if key_ok is not None else q_last  # unread without it
    _decode_split[(splits, b * hs)](
        q, k, v, tokens, q_last, key_ok, m_part, l_part, acc_part,
        *q.stride(), *k.stride(), *v.stride(), *tokens.stride(), q_last.stride(0),
        n_slots, size, splits, nk, nq, hs, group, hs // hkv, scale * LOG2E, softcap,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_KEY_OK=key_ok is not q_last, HAS_SOFTCAP=softcap > 0, IEEE=q.dtype == torch.float32,
        num_warps=num_warps,
    )  # fmt: skip
    _decode_combine[(b * hs, group * nq)](
        m_part, l_part, acc_part, out, *out.stride(), splits, nq, hs, group,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_S=max(2, triton.next_power_of_2(splits)),
    )  # fmt: skip
    return out


def decode_keep(tokens, q_last, key_ok, n_q: int, n_keys: int, q_heads: int) -> torch.Tensor:
    """(B, Hq, Nq, S) bool: which listed slots each query row keeps (the notation's rule)."""
    b, hs, _ = tokens.shape
    t = tokens.long()
    valid = (t >= 0) & (t < n_keys)
    if key_ok is not None:
        valid &= torch.gather(key_ok, 1, t.clamp(0, n_keys - 1).reshape(b, -1)).view_as(t)
    rows = torch.arange(n_q, device=tokens.device)
    limit = q_last.long()[:, None] - (n_q - 1 - rows)  # (B, Nq)
    keep = valid[:, :, None, :] & (t[:, :, None, :] <= limit[:, None, :, None])  # (B, Hs, Nq, S)
    return keep.repeat_interleave(q_heads // hs, dim=1)


def sparse_decode_reference(q, k, v, tokens, q_last, key_ok, scale: float, softcap: float = 0.0) -> torch.Tensor:
    """The notation's semantics in PyTorch (fp32): gather the listed rows, mask, softmax."""
    check_decode_inputs(q, k, v, tokens, q_last, key_ok)
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    hs = tokens.shape[1]
    idx = tokens.long().clamp(0, nk - 1)  # (B, Hs, S)
    kv_head = torch.arange(hs, device=q.device) // (hs // hkv)

    def gather(t):  # (B, Hs, S, D): the listed rows of each selection head's KV head
        return torch.gather(t[:, kv_head].float(), 2, idx[..., None].expand(-1, -1, -1, d))

    ks, vs = gather(k), gather(v)
    group = hq // hs
    qf = q.float().view(b, hs, group * nq, d)
    s = (qf @ ks.transpose(-1, -2)) * scale  # (B, Hs, G*Nq, S)
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    keep = decode_keep(tokens, q_last, key_ok, nq, nk, hq).view(b, hs, group * nq, -1)
    s = s.masked_fill(~keep, float("-inf"))
    row_max = s.amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).min)
    p = torch.exp(s - row_max)
    denom = p.sum(-1, keepdim=True)
    o = torch.where(denom == 0, 0.0, (p @ vs) / denom)
    return o.view(b, hq, nq, d).to(q.dtype)


@torch.library.custom_op("sparsecomp::sparse_decode", mutates_args=())
def sparse_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tokens: torch.Tensor,
    q_last: torch.Tensor,
    key_ok: torch.Tensor | None,
    scale: float,
    softcap: float,
) -> torch.Tensor:
    """Attention of a few query rows over the listed tokens (see the notation above): the Triton
    kernels on CUDA, the reference elsewhere."""
    if q.is_cuda:
        return sparse_decode_triton(q, k, v, tokens, q_last, key_ok, scale, softcap)
    return sparse_decode_reference(q, k, v, tokens, q_last, key_ok, scale, softcap)


@sparse_decode.register_fake
def _sparse_decode_fake(q, k, v, *args):
    return q.new_empty(q.shape)
