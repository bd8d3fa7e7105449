"""Recall of a sparse pattern on given Q, K, V: how much attention it keeps and what that costs.

For each query head, over the query rows that see at least one key:
    cra      cumulative residual attention: the mean over rows of the exact (dense) attention mass
             on the kept keys (1 = nothing lost);
    density  kept pairs / pairs the structure (causal, window, padding) allows;
    out_err  ||o_sparse - o_dense|| / ||o_dense|| of the attention outputs (fp32).
Computed in chunks of query rows: memory O(chunk x Nk), never Nq x Nk. Used by the tests, by
calibration and by the inspect report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..kernels import SparseIndex
from ..kernels.prefill.block_sparse_attention import index_pairs, structure_pairs

_CHUNK_ELEMENTS = 1 << 25


@dataclass
class Recall:
    cra: torch.Tensor  # (Hq,) per query head
    density: torch.Tensor  # (Hq,)
    out_err: torch.Tensor  # (Hq,)

    def summary(self) -> dict:
        return {
            "cra": self.cra.mean().item(),
            "density": self.density.mean().item(),
            "out_err": self.out_err.mean().item(),
        }


class KeptMass(NamedTuple):
    """What ``kept_mass`` measures, each (candidates, Hq) fp64."""

    cra: torch.Tensor
    density: torch.Tensor
    out_err: torch.Tensor | None  # with v
    influence: torch.Tensor | None  # kept influence / all influence (with v and out_grad)
    lost_influence: torch.Tensor | None  # sum over rows of |g_i . (o_sparse - o_dense)_i|: a loss change estimate


def _dense_chunks(q, k, q_pos, k_pos, key_ok, *, scale: float, causal: bool, window: int):
    """Exact attention in chunks of query rows: yields (r0, r1, scores, p, allowed, seen), with
    scores (B, Hq, rows, Nk) fp32 scaled, p their softmax under the structure, ``seen`` the rows
    that see some key (B, Hq, rows)."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    kf = k.float()[:, :, None]
    step = max(1, _CHUNK_ELEMENTS // max(1, b * hq * nk))
    for r0 in range(0, nq, step):
        r1 = min(nq, r0 + step)
        qc = q[:, :, r0:r1].float().view(b, hkv, hq // hkv, r1 - r0, d)
        s = (qc @ kf.transpose(-1, -2)).view(b, hq, r1 - r0, nk) * scale
        allowed = structure_pairs(q_pos[:, r0:r1], k_pos, key_ok, causal=causal, window=window)
        p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
        yield r0, r1, s, p, allowed, allowed.any(-1).expand(b, hq, r1 - r0)


def _kept_rows(index: SparseIndex, q_pos, k_pos, key_ok, head_sink, head_window, **structure):
    return index_pairs(
        q_pos, k_pos, key_ok, *index[:4], index.columns, index.column_count, head_sink, head_window, **structure
    )


def kept_mass(
    q, k, q_pos, k_pos, key_ok, candidates, *, scale: float, causal: bool, window: int, block_m: int,
    block_n: int, v=None, out_grad=None,
) -> KeptMass:  # fmt: skip
    """CRA, density, (with ``v``) output error and (with ``v`` and ``out_grad``, the loss gradient
    of the attention output) kept and lost influence of several candidate patterns at once, exact
    attention computed once per chunk. ``candidates``: (index, head_sink, head_window) per candidate.

    Influence (MoA's first-order loss change of removing a pair, softmax renormalization included):
    I[i, j] = |p[i, j] * g_i . (v_j - o_i)| with g = out_grad, o the exact output; a candidate's
    kept influence is the sum of I over its kept pairs / the sum over all pairs, per head. Its lost
    influence is the first-order loss change of its actual output change, per row, summed over rows:
    sum_i |g_i . (o_sparse_i - o_i)| (renormalization exact, cancellation within a row counted; not
    normalized: heads the loss depends on more weigh more)."""
    b, hq, _, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    structure = dict(causal=causal, window=window, block_m=block_m, block_n=block_n)
    kept = [_kept_rows(ix, q_pos, k_pos, key_ok, sink, win, **structure) for ix, sink, win in candidates]
    mass = torch.zeros(len(candidates), hq, dtype=torch.float64, device=q.device)
    kept_n, err2 = torch.zeros_like(mass), torch.zeros_like(mass)
    rows_seen = torch.zeros(hq, dtype=torch.float64, device=q.device)
    allowed_n, ref2 = torch.zeros_like(rows_seen), torch.zeros_like(rows_seen)
    kept_infl, total_infl, lost = torch.zeros_like(mass), torch.zeros_like(rows_seen), torch.zeros_like(mass)
    vf = v.float()[:, :, None] if v is not None else None

    def output(p, rows):  # (B, Hq, rows, Nk) weights -> (B, Hq, rows, D) attention output
        return (p.view(b, hkv, hq // hkv, rows, nk) @ vf).view(b, hq, rows, d)

    chunks = _dense_chunks(q, k, q_pos, k_pos, key_ok, scale=scale, causal=causal, window=window)
    for r0, r1, _, p, allowed, seen in chunks:
        rows_seen += seen.sum((0, 2)).double()
        allowed_n += allowed.expand(*p.shape).sum((0, 2, 3)).double()
        if v is not None:
            o_dense = output(p, r1 - r0)
            ref2 += o_dense.pow(2).sum((0, 2, 3)).double()
        if out_grad is not None:
            g = out_grad[:, :, r0:r1].float()
            g_v = (g.view(b, hkv, hq // hkv, r1 - r0, d) @ vf.transpose(-1, -2)).view(*p.shape)
            influence = (p * (g_v - (g * o_dense).sum(-1, keepdim=True))).abs()
            total_infl += influence.sum((0, 2, 3)).double()
        for c, rows in enumerate(kept):
            keep = rows(r0, r1)
            p_kept = p * keep
            kept_sum = p_kept.sum(-1)
            mass[c] += kept_sum.where(seen, 0.0).sum((0, 2)).double()
            kept_n[c] += (keep & allowed).expand(*p.shape).sum((0, 2, 3)).double()
            if v is not None:  # the sparse softmax is the kept weights renormalized
                o_sparse = output(p_kept / kept_sum.clamp_min(1e-30)[..., None], r1 - r0)
                err2[c] += (o_sparse - o_dense).pow(2).sum((0, 2, 3)).double()
            if out_grad is not None:
                kept_infl[c] += (influence * keep).sum((0, 2, 3)).double()
                lost[c] += (g * (o_sparse - o_dense)).sum(-1).abs().sum((0, 2)).double()
    out_err = (err2.sqrt() / ref2.sqrt().clamp_min(1e-30)) if v is not None else None
    kept_and_lost = (kept_infl / total_infl.clamp_min(1e-30), lost) if out_grad is not None else (None, None)
    return KeptMass(mass / rows_seen.clamp_min(1), kept_n / allowed_n.clamp_min(1), out_err, *kept_and_lost)


def pattern_recall(
    q, k, v, index: SparseIndex, q_pos, k_pos, key_ok, head_sink, head_window, *, scale: float,
    causal: bool, window: int, block_m: int, block_n: int,
) -> Recall:  # fmt: skip
    """Recall of ``index`` (with the heads' local rules) against exact attention on q, k, v."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g = hq // hkv
    kept_rows = _kept_rows(
        index, q_pos, k_pos, key_ok, head_sink, head_window, causal=causal, window=window, block_m=block_m,
        block_n=block_n,
    )  # fmt: skip
    vf = v.float()[:, :, None]
    mass = torch.zeros(hq, dtype=torch.float64, device=q.device)
    rows_seen = torch.zeros(hq, dtype=torch.float64, device=q.device)
    kept_n = torch.zeros(hq, dtype=torch.float64, device=q.device)
    allowed_n = torch.zeros(hq, dtype=torch.float64, device=q.device)
    err2 = torch.zeros(hq, dtype=torch.float64, device=q.device)
    ref2 = torch.zeros(hq, dtype=torch.float64, device=q.device)
    for r0, r1, s, p, allowed, seen in _dense_chunks(q, k, q_pos, k_pos, key_ok, scale=scale, causal=causal,
                                                     window=window):  # fmt: skip
        keep = kept_rows(r0, r1)
        mass += (p * keep).sum(-1).where(seen, 0.0).sum((0, 2)).double()
        rows_seen += seen.sum((0, 2)).double()
        kept_n += (keep & allowed).expand(b, hq, -1, -1).sum((0, 2, 3)).double()
        allowed_n += allowed.expand(b, hq, -1, -1).sum((0, 2, 3)).double()
        o_dense = (p.view(b, hkv, g, r1 - r0, nk) @ vf).view(b, hq, r1 - r0, d)
        ps = torch.softmax(s.masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0)
        o_sparse = (ps.view(b, hkv, g, r1 - r0, nk) @ vf).view(b, hq, r1 - r0, d)
        err2 += (o_sparse - o_dense).pow(2).sum((0, 2, 3)).double()
        ref2 += o_dense.pow(2).sum((0, 2, 3)).double()
    return Recall(
        cra=(mass / rows_seen.clamp_min(1)).float(),
        density=(kept_n / allowed_n.clamp_min(1)).float(),
        out_err=(err2.sqrt() / ref2.sqrt().clamp_min(1e-30)).float(),
    )
