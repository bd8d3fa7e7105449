"""What a decode step attends to: approximate scores from the state kept beside the KV cache, then
the top tokens or pages as a fixed-size list for ``sparse_decode``.

Notation (as in sparse_decode.py; Hs selection heads, G = Hq / Hs query heads each, C channels):
    Double Sparsity: labels (B, Hkv, Nk, C) = k[..., channels] (the calibrated outlier channels of
        each KV head, stored contiguously: a step reads C/D of K's bytes);
        score[b, hs, t] = max over the selection head's query rows of  q[..., channels] . labels[t].
    Quest: per page of P keys the elementwise min and max of K over its valid keys, (B, Hkv, Np, D);
        bound[b, hs, p] = max over rows of  sum_d max(q_d * kmin_d, q_d * kmax_d)  >= q . k for every
        key of the page.
    Keys that no query row may see (padding, after q_last) score -inf; pages with no valid key too.
    The max over a group's rows keeps a token that any of its query heads needs.

Each score has a Triton kernel (one program = one block of keys or pages of one selection head) and
its PyTorch reference; off CUDA the op runs the reference.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..prefill.block_index import first_valid_key, last_valid_key
from .sparse_decode import selection_rows


# fmt: off
@triton.jit
def _label_scores(
    QC, Labels, QLast, KeyOk, Out,
    sqb, sqh, sqn, sqc, slb, slh, sln, slc, n_keys, n_q, n_sel, group, sel_per_kv, n_channels,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, HAS_KEY_OK: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b, kvh, qrow, row_ok, q = selection_rows(QC, pid_bh, sqb, sqh, sqn, sqc, n_q, n_sel, group, sel_per_kv,
                                             n_channels, BLOCK_M, BLOCK_C)
    offs_c = tl.arange(0, BLOCK_C)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = offs_c < n_channels
    n_ok = offs_n < n_keys
    last = tl.load(QLast + b)
    # keys after the last query are never read (a static cache is longer than what it holds)
    lab = tl.load(Labels + b * slb + kvh * slh + offs_n[:, None] * sln + offs_c[None, :] * slc,
                  mask=(n_ok & (offs_n <= last))[:, None] & c_ok[None, :], other=0.0)
    # (BLOCK_M, BLOCK_N) on tensor cores: an elementwise product and sum ran at 0.7 TB/s
    if IEEE:
        s = tl.dot(q.to(tl.float32), tl.trans(lab.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q.to(lab.dtype), tl.trans(lab))
    limit = last - (n_q - 1 - qrow)
    see = row_ok[:, None] & (offs_n[None, :] <= limit[:, None])
    if HAS_KEY_OK:
        see &= (tl.load(KeyOk + b * n_keys + offs_n, mask=n_ok, other=0) != 0)[None, :]
    s = tl.max(tl.where(see, s, float("-inf")), 0)
    tl.store(Out + pid_bh * n_keys + offs_n, s, mask=n_ok)


@triton.jit
def _page_bounds(
    Q, KMin, KMax, QLast, PageOk, Out,
    sqb, sqh, sqn, sqd, spb, sph, spp, spd, n_pages, page, n_q, n_sel, group, sel_per_kv,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b, kvh, qrow, row_ok, q = selection_rows(Q, pid_bh, sqb, sqh, sqn, sqd, n_q, n_sel, group, sel_per_kv,
                                             HEAD_DIM, BLOCK_M, BLOCK_D)
    offs_d = tl.arange(0, BLOCK_D)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    d_ok = offs_d < HEAD_DIM
    p_ok = offs_p < n_pages
    last = tl.load(QLast + b)
    read = ((p_ok & (offs_p * page <= last))[:, None]) & d_ok[None, :]  # pages after the last query: unread
    base = b * spb + kvh * sph + offs_p[:, None] * spp + offs_d[None, :] * spd
    kmin = tl.load(KMin + base, mask=read, other=0.0)
    kmax = tl.load(KMax + base, mask=read, other=0.0)
    # sum_d max(q_d kmin_d, q_d kmax_d) = max(q, 0) . kmax + min(q, 0) . kmin (kmin <= kmax): two
    # products on tensor cores, exact as the elementwise form
    q_pos = tl.maximum(q, 0.0)
    q_neg = tl.minimum(q, 0.0)
    if IEEE:
        bound = tl.dot(q_pos.to(tl.float32), tl.trans(kmax.to(tl.float32)), input_precision="ieee")
        bound = tl.dot(q_neg.to(tl.float32), tl.trans(kmin.to(tl.float32)), bound, input_precision="ieee")
    else:
        bound = tl.dot(q_pos.to(kmax.dtype), tl.trans(kmax))
        bound = tl.dot(q_neg.to(kmin.dtype), tl.trans(kmin), bound)
    limit = last - (n_q - 1 - qrow)
    see = row_ok[:, None] & (offs_p[None, :] * page <= limit[:, None])
    see &= (tl.load(PageOk + b * n_pages + offs_p, mask=p_ok, other=0) != 0)[None, :]
    bound = tl.max(tl.where(see, bound, float("-inf")), 0)
    tl.store(Out + pid_bh * n_pages + offs_p, bound, mask=p_ok)
# fmt: on


def _rows_of(q: torch.Tensor, n_sel: int):
    b, hq, nq, _ = q.shape
    group = hq // n_sel
    return b, hq, nq, group, max(1, triton.next_power_of_2(group * nq))


def _visible(q_last, n_q: int, positions: torch.Tensor) -> torch.Tensor:
    """(B, Nq, N) bool: query row i of Nq sees position ``positions`` (<= q_last - (Nq-1-i))."""
    rows = torch.arange(n_q, device=q_last.device)
    limit = q_last.long()[:, None] - (n_q - 1 - rows)
    return positions[None, None, :] <= limit[:, :, None]


def _group_max(s: torch.Tensor, see: torch.Tensor, n_sel: int) -> torch.Tensor:
    """(B, Hq, Nq, N) scores, masked, to (B, Hs, N): the max over each selection head's rows."""
    b, hq, nq, n = s.shape
    s = s.masked_fill(~see, float("-inf"))
    return s.view(b, n_sel, (hq // n_sel) * nq, n).amax(2)


def label_scores_reference(q_channels, labels, q_last, key_ok, n_sel: int) -> torch.Tensor:
    """(B, Hs, Nk) fp32 approximate scores (Double Sparsity) in PyTorch. ``q_channels``
    (B, Hq, Nq, C): each query head's values at its KV head's channels."""
    b, hq, nq, _ = q_channels.shape
    hkv, nk = labels.shape[1], labels.shape[2]
    lab = labels.float().repeat_interleave(hq // hkv, dim=1)
    s = q_channels.float() @ lab.transpose(-1, -2)  # (B, Hq, Nq, Nk)
    see = _visible(q_last, nq, torch.arange(nk, device=q_last.device))[:, None]
    if key_ok is not None:
        see = see & key_ok[:, None, None, :]
    return _group_max(s, see.expand(b, hq, nq, nk), n_sel)


def page_bounds_reference(q, kmin, kmax, q_last, page_ok, page: int, n_sel: int) -> torch.Tensor:
    """(B, Hs, Np) fp32 page upper bounds (Quest) in PyTorch."""
    b, hq, nq, _ = q.shape
    hkv, n_pages = kmin.shape[1], kmin.shape[2]
    g = hq // hkv
    qf = q.float()[:, :, :, None, :]  # (B, Hq, Nq, 1, D)
    lo = kmin.float().repeat_interleave(g, dim=1)[:, :, None]  # (B, Hq, 1, Np, D)
    hi = kmax.float().repeat_interleave(g, dim=1)[:, :, None]
    bound = torch.maximum(qf * lo, qf * hi).sum(-1)  # (B, Hq, Nq, Np)
    starts = torch.arange(n_pages, device=q.device) * page
    see = _visible(q_last, nq, starts)[:, None] & page_ok[:, None, None, :]
    return _group_max(bound, see.expand(b, hq, nq, n_pages), n_sel)


def label_scores_triton(q_channels, labels, q_last, key_ok, n_sel: int, block_n: int = 256,
                        num_warps: int = 4):  # fmt: skip
    b, hq, nq, group, block_m = _rows_of(q_channels, n_sel)
    block_m = max(16, block_m)  # tl.dot's smallest tile
    hkv, nk, c = labels.shape[1], labels.shape[2], labels.shape[3]
    out = torch.empty(b, n_sel, nk, dtype=torch.float32, device=labels.device)
    q_last = q_last.contiguous()
    key_ok = key_ok.contiguous().view(torch.uint8) if key_ok is not None else q_last  # unread without it
    _label_scores[(triton.cdiv(nk, block_n), b * n_sel)](
        q_channels, labels, q_last, key_ok, out, *q_channels.stride(), *labels.stride(),
        nk, nq, n_sel, group, n_sel // hkv, c,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_C=max(16, triton.next_power_of_2(c)), HAS_KEY_OK=key_ok is not q_last,
        IEEE=labels.dtype == torch.float32, num_warps=num_warps,
    )  # fmt: skip
    return out


def page_bounds_triton(q, kmin, kmax, q_last, page_ok, page: int, n_sel: int, block_p: int = 64):
    b, hq, nq, group, block_m = _rows_of(q, n_sel)
    block_m = max(16, block_m)  # tl.dot's smallest tile
    hkv, n_pages, d = kmin.shape[1], kmin.shape[2], kmin.shape[3]
    if kmax.stride() != kmin.stride():
        kmax = kmax.contiguous()
        kmin = kmin.contiguous()
    out = torch.empty(b, n_sel, n_pages, dtype=torch.float32, device=q.device)
    _page_bounds[(triton.cdiv(n_pages, block_p), b * n_sel)](
        q, kmin, kmax, q_last.contiguous(), page_ok.contiguous().view(torch.uint8), out,
        *q.stride(), *kmin.stride(), n_pages, page, nq, n_sel, group, n_sel // hkv,
        HEAD_DIM=d, BLOCK_M=block_m, BLOCK_P=block_p, BLOCK_D=max(16, triton.next_power_of_2(d)),
        IEEE=kmin.dtype == torch.float32,
    )  # fmt: skip
    return out


@torch.library.custom_op("sparsecomp::label_scores", mutates_args=())
def label_scores(
    q_channels: torch.Tensor, labels: torch.Tensor, q_last: torch.Tensor, key_ok: torch.Tensor | None, n_sel: int
) -> torch.Tensor:
    """Double Sparsity's approximate scores (see the notation above)."""
    if labels.is_cuda:
        return label_scores_triton(q_channels, labels, q_last, key_ok, n_sel)
    return label_scores_reference(q_channels, labels, q_last, key_ok, n_sel)


@label_scores.register_fake
def _label_scores_fake(q_channels, labels, q_last, key_ok, n_sel):
    return labels.new_empty(labels.shape[0], n_sel, labels.shape[2], dtype=torch.float32)


@torch.library.custom_op("sparsecomp::page_bounds", mutates_args=())
def page_bounds(
    q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, q_last: torch.Tensor, page_ok: torch.Tensor,
    page: int, n_sel: int,
) -> torch.Tensor:  # fmt: skip
    """Quest's per-page upper bounds of q . k (see the notation above)."""
    if q.is_cuda:
        return page_bounds_triton(q, kmin, kmax, q_last, page_ok, page, n_sel)
    return page_bounds_reference(q, kmin, kmax, q_last, page_ok, page, n_sel)


@page_bounds.register_fake
def _page_bounds_fake(q, kmin, kmax, q_last, page_ok, page, n_sel):
    return q.new_empty(q.shape[0], n_sel, kmin.shape[2], dtype=torch.float32)


def query_channels(q: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """(B, Hq, Nq, C): each query head's values at its KV head's channels ((Hkv, C) int64)."""
    hq, hkv = q.shape[1], channels.shape[0]
    per_q_head = channels.repeat_interleave(hq // hkv, dim=0)  # (Hq, C)
    return torch.gather(q, 3, per_q_head[None, :, None, :].expand(q.shape[0], -1, q.shape[2], -1))


def key_labels(k: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, N, C) labels of keys ``k`` (B, Hkv, N, D): each KV head's calibrated channels."""
    return torch.gather(k, 3, channels[None, :, None, :].expand(k.shape[0], -1, k.shape[2], -1))


def page_min_max(
    k: torch.Tensor, key_ok: torch.Tensor | None, page: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kmin, kmax, page_ok) over pages of ``page`` keys of k (B, Hkv, N, D), N a multiple of page:
    min / max over each page's valid keys (zeros for a page with none, which page_ok marks)."""
    b, hkv, n, d = k.shape
    pages = k.view(b, hkv, n // page, page, d)
    if key_ok is None:
        return pages.amin(3), pages.amax(3), torch.ones(b, n // page, dtype=torch.bool, device=k.device)
    ok = key_ok.view(b, 1, n // page, page, 1)
    big = torch.finfo(k.dtype).max
    kmin = pages.masked_fill(~ok, big).amin(3)
    kmax = pages.masked_fill(~ok, -big).amax(3)
    page_ok = key_ok.view(b, n // page, page).any(-1)
    none = ~page_ok[:, None, :, None]
    return kmin.masked_fill(none, 0), kmax.masked_fill(none, 0), page_ok


def top_tokens(scores: torch.Tensor, n: int) -> torch.Tensor:
    """(..., n) int32: the n highest-scoring keys of each row of ``scores`` (..., N), unordered
    (entries scoring -inf are masked by the kernel's validity rule, so a list longer than the valid
    keys is still exact). torch.topk: radix selections of our own measured slower where it matters.
    One with atomic slot counters was 1.8-6x slower on the H200; an exact one with deterministic
    compaction (three 11-bit histogram levels, count and write passes) was, on an H100 against
    torch.topk's 68 us at 128K keys x 8 rows, 261 us with per-chunk tl.histogram and 70 us with one
    atomic per key (4x and 2.7x slower at 512K; 1.5-1.8x faster only for rows of 8K-32K). Both
    crowded their histograms (tl.histogram's cost grows with its bins); ``top_select`` now counts
    8-bit digits (256 bins, four levels), parity-tested but not yet timed on a GPU:
    ``benchmarks/top_select.py`` and decode_attention.py's radix columns decide this default."""
    return torch.topk(scores, n, dim=-1, sorted=False).indices.to(torch.int32)


def page_tokens(pages: torch.Tensor, page: int) -> torch.Tensor:
    """(B, Hs, n_pages * page) int32 token indices of the listed pages (B, Hs, n_pages)."""
    offs = torch.arange(page, device=pages.device, dtype=torch.int32)
    return (pages[..., None].to(torch.int32) * page + offs).flatten(-2)


def window_tokens(key_ok: torch.Tensor | None, k: torch.Tensor, n_sel: int, sink: int, window: int) -> torch.Tensor:
    """(B, n_sel, sink + window) int32: a one-row decode step's StreamingLLM keys, the same for every
    selection head: each batch row's first ``sink`` existing keys (sinks count from the first one,
    as in the prefill kernel) and the ``window`` keys ending at the step's key (the last existing
    one); a key in both is listed once, unused slots are -1 (the kernel skips them)."""
    b, n_k = k.shape[0], k.shape[2]
    if key_ok is None:
        start = torch.zeros(1, 1, dtype=torch.int64, device=k.device)
        last = torch.full((1, 1), n_k - 1, dtype=torch.int64, device=k.device)
    else:
        start, last = first_valid_key(key_ok, k.device)[:, None], last_valid_key(key_ok)
    sinks = start + torch.arange(sink, device=k.device)
    recent = last - window + 1 + torch.arange(window, device=k.device)
    sinks = sinks.where(sinks <= last, -1)
    recent = recent.where(recent >= start + sink, -1)  # among the sinks already, or before the first key
    tokens = torch.cat([sinks, recent], -1).to(torch.int32)
    return tokens[:, None].expand(b, n_sel, sink + window).contiguous()


def merge_selections(token_lists: list[torch.Tensor], owner: tuple[int, ...]) -> torch.Tensor:
    """(B, Hs, S) int32: selection head hs's tokens from ``token_lists[owner[hs]]`` (each (B, Hs, S_i),
    the shorter ones padded with -1 up to the longest, S)."""
    longest = functools.reduce(torch.sym_max, [t.shape[-1] for t in token_lists])
    padded = torch.stack([torch.nn.functional.pad(t, (0, longest - t.shape[-1]), value=-1) for t in token_lists])
    heads = torch.arange(len(owner), device=padded.device)
    pick = torch.tensor(owner, device=padded.device)
    return padded[pick, :, heads].transpose(0, 1).contiguous()  # (Hs, B, S) -> (B, Hs, S)
