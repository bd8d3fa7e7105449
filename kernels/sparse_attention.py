"""Block-sparse attention over the sparse index: the op every prefill pattern lowers to.

Notation (see ``block_index.py`` for the index and the kept-pair rule):
    q (B, Hq, Nq, D), k / v (B, Hkv, Nk, D): GQA-native, query head h reads KV head h // (Hq / Hkv).
    s[i, j] = scale * q[i] . k[j]; with softcap c > 0: s = c * tanh(s / c)   (Gemma 2)
    out[i] = sum_j p[i, j] v[j],  p = softmax over the kept keys j of row i.
    A kept key must be in one of the row's listed blocks (``full`` or ``part``) and pass the
    structure mask and the head's local rule. Rows that keep no key give zeros, never NaN.

This file holds the op registration and the PyTorch reference. The reference computes in chunks
of query rows (memory O(chunk * Nk), never Nq x Nk) and is the CPU implementation of the op.
"""

from __future__ import annotations

import torch

from .block_index import first_valid_key

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256
_CHUNK_ELEMENTS = 1 << 26  # scores held at once by the reference: 256 MiB of fp32


def check_head_dim(head_dim: int) -> str | None:
    """Why a head dimension cannot run, or None. Non powers of two are padded by the kernel."""
    if head_dim < 16 or head_dim > _MAX_HEAD_DIM or head_dim % 8:
        return f"head_dim={head_dim}; supported: multiples of 8 from 16 to {_MAX_HEAD_DIM}"
    return None


def _check_inputs(q, k, v, q_pos, k_pos, key_ok, head_sink, head_window):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, H, N, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    b, hq, nq, d = q.shape
    if k.shape[0] != b or v.shape[:3] != k.shape[:3] or k.shape[-1] != d:
        raise ValueError(f"k/v shapes {tuple(k.shape)} / {tuple(v.shape)} do not fit q {tuple(q.shape)}")
    if hq % k.shape[1]:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({k.shape[1]})")
    if v.shape[-1] != d:
        raise ValueError(f"value head_dim {v.shape[-1]} differs from query head_dim {d}; not supported")
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"dtypes q={q.dtype} k={k.dtype} v={v.dtype}; supported: one of {SUPPORTED_DTYPES}")
    if (reason := check_head_dim(d)) is not None:
        raise ValueError(reason)
    if q_pos.shape[-1] != nq or k_pos.shape[-1] != k.shape[2]:
        raise ValueError(f"positions {tuple(q_pos.shape)} / {tuple(k_pos.shape)} do not fit Nq={nq}, Nk={k.shape[2]}")
    if key_ok is not None and key_ok.shape[-1] != k.shape[2]:
        raise ValueError(f"key_ok {tuple(key_ok.shape)} does not fit Nk={k.shape[2]}")
    if head_sink.numel() != hq or head_window.numel() != hq:
        raise ValueError(f"per-head rules have {head_sink.numel()} / {head_window.numel()} entries; Hq={hq}")


def kept_pairs(q_pos_rows, k_pos, key_ok, start, head_sink, head_window, *, causal: bool, window: int) -> torch.Tensor:
    """Structure mask and per-head local rule for some query rows: (B', Hq, rows, Nk) bool."""
    qp = q_pos_rows[:, None, :, None].to(torch.int64)
    kp = k_pos[:, None, None, :].to(torch.int64)
    keep = torch.ones((), dtype=torch.bool, device=q_pos_rows.device)
    if causal:
        keep = keep & (kp <= qp)
    if window > 0:
        keep = keep & (qp - kp < window)
    if key_ok is not None:
        keep = keep & key_ok[:, None, None, :]
    w = head_window.to(torch.int64)[None, :, None, None]
    s = head_sink.to(torch.int64)[None, :, None, None]
    key_idx = torch.arange(k_pos.shape[-1], device=k_pos.device)[None, None, None, :]
    local = (w <= 0) | (qp - kp < w) | (key_idx - start[:, None, None, None] < s)
    return keep & local


def _listed(blocks, count, n_k_blocks):
    """(B', Hq, nQB, L) lists → (B', Hq, nQB, nKB) membership."""
    slot = torch.arange(blocks.shape[-1], device=blocks.device)
    ids = torch.where(slot < count[..., None], blocks.to(torch.int64), n_k_blocks)
    member = torch.zeros(*blocks.shape[:-1], n_k_blocks + 1, dtype=torch.bool, device=blocks.device)
    return member.scatter_(-1, ids, True)[..., :n_k_blocks]


def sparse_attention_reference(
    q,
    k,
    v,
    q_pos,
    k_pos,
    key_ok,
    full_blocks,
    full_count,
    part_blocks,
    part_count,
    head_sink,
    head_window,
    scale: float,
    causal: bool,
    window: int,
    softcap: float,
    block_m: int,
    block_n: int,
) -> torch.Tensor:
    """Plain PyTorch semantics of ``sparse_attention`` (fp32 math), chunked over query rows."""
    _check_inputs(q, k, v, q_pos, k_pos, key_ok, head_sink, head_window)
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    groups = hq // hkv
    n_kb = -(-nk // block_n)
    listed = _listed(full_blocks, full_count, n_kb) | _listed(part_blocks, part_count, n_kb)
    start = first_valid_key(key_ok, q.device)
    kf = k.float()[:, :, None]  # (B, Hkv, 1, Nk, D)
    vf = v.float()[:, :, None]
    out = torch.empty(b, hq, nq, d, dtype=q.dtype, device=q.device)
    rows_per_chunk = max(block_m, (_CHUNK_ELEMENTS // max(1, b * hq * nk)) // block_m * block_m)
    for r0 in range(0, nq, rows_per_chunk):
        r1 = min(nq, r0 + rows_per_chunk)
        qc = q[:, :, r0:r1].float().view(b, hkv, groups, r1 - r0, d)
        s = (qc @ kf.transpose(-1, -2)).view(b, hq, r1 - r0, nk) * scale
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        rows = torch.arange(r0, r1, device=q.device)
        in_index = listed[:, :, rows // block_m].repeat_interleave(block_n, dim=-1)[..., :nk]
        keep = in_index & kept_pairs(
            q_pos[:, r0:r1], k_pos, key_ok, start, head_sink, head_window, causal=causal, window=window
        )
        s = s.masked_fill(~keep, float("-inf"))
        row_max = s.amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).min)
        p = torch.exp(s - row_max)
        denom = p.sum(-1, keepdim=True)
        o = (p.view(b, hkv, groups, r1 - r0, nk) @ vf).view(b, hq, r1 - r0, d)
        out[:, :, r0:r1] = torch.where(denom > 0, o / denom.clamp_min(1e-30), 0.0).to(q.dtype)
    return out


@torch.library.triton_op("sparsecomp::sparse_attention", mutates_args=())
def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    key_ok: torch.Tensor | None,
    full_blocks: torch.Tensor,
    full_count: torch.Tensor,
    part_blocks: torch.Tensor,
    part_count: torch.Tensor,
    head_sink: torch.Tensor,
    head_window: torch.Tensor,
    scale: float,
    causal: bool,
    window: int,
    softcap: float,
    block_m: int,
    block_n: int,
) -> torch.Tensor:
    """Block-sparse attention (see the notation above). The Triton kernel is the next step;
    until it lands every device runs the reference."""
    return sparse_attention_reference(
        q,
        k,
        v,
        q_pos,
        k_pos,
        key_ok,
        full_blocks,
        full_count,
        part_blocks,
        part_count,
        head_sink,
        head_window,
        scale,
        causal,
        window,
        softcap,
        block_m,
        block_n,
    )


@sparse_attention.register_fake
def _sparse_attention_fake(q, k, v, *args):
    return q.new_empty(q.shape)
