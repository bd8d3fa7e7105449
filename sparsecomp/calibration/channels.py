"""Double Sparsity's offline calibration: per site and KV head, the channels of K that carry most of
q . k on calibration text, written into the plan (``plan.channels``).

A channel's importance is its share of |q . k| over the causal pairs the site computes:
    importance[g, d] = sum over query heads h of KV group g, rows i:  |q[h, i, d]| * sum_{j <= i} |k[g, j, d]|
(padding keys excluded). The top ``channels`` of each KV head are kept, in ascending index order.
"""

from __future__ import annotations

import dataclasses

import torch

from ..plan import Plan
from .observe import observe_prefill


def channel_importance(q, k, key_ok) -> torch.Tensor:
    """(Hkv, D) fp64 importance of each channel of a causal site (see the module docstring).
    q (B, Hq, N, D) and k (B, Hkv, N, D) of one prefill; key_ok (B, N) bool or None."""
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    ka = k.double().abs()
    if key_ok is not None:
        ka = ka * key_ok[:, None, :, None]
    seen = ka.cumsum(2)  # sum over keys j <= i of |k_j|, per channel
    qa = q.double().abs().view(b, hkv, hq // hkv, n, d)
    return (qa * seen[:, :, None]).sum((0, 2, 3))


def top_channels(importance: torch.Tensor, channels: int) -> list[list[int]]:
    return [sorted(row.topk(channels).indices.tolist()) for row in importance]


def _rule_channels(plan: Plan) -> int | None:
    """The channel count the plan's Double Sparsity rules read (they must agree), or None."""
    entries = [plan.decode_default, *plan.decode_sites.values()]
    rules = [r for e in entries if e is not None for r in (e if isinstance(e, list) else [e])]
    counts = {r.channels for r in rules if r.kind == "double_sparsity"}
    if len(counts) > 1:
        raise ValueError(f"the plan's double_sparsity rules read different channel counts {sorted(counts)}")
    return counts.pop() if counts else None


def calibrate_channels(
    model: torch.nn.Module, inputs, plan: Plan | str | None = None, channels: int | None = None
) -> Plan:
    """``plan`` (a Plan or preset; None: dense) with calibrated channels per KV head of every attention
    site, measured on ``inputs`` (token-id tensors, (N,) or (B, N)), for its Double Sparsity decode
    rules; ``channels`` None: as many as those rules read (16 if none does)."""
    plan = Plan.from_any(plan)
    channels = channels or _rule_channels(plan) or 16
    importance: dict[str, torch.Tensor] = {}

    def observe(out, q, k, v, q_pos, k_pos, key_ok, *, site, **structure):
        with torch.no_grad():
            score = channel_importance(q.detach(), k.detach(), key_ok).cpu()
        importance[site] = importance.get(site, 0) + score
        return out

    observe_prefill(model, observe, inputs)
    if not importance:
        raise ValueError("no causal attention site was observed: nothing to calibrate channels on")
    head_dim = next(iter(importance.values())).shape[1]
    if not 0 < channels <= head_dim:
        raise ValueError(f"channels={channels}; give 1 .. head_dim ({head_dim})")
    found = {name: top_channels(score, channels) for name, score in importance.items()}
    return dataclasses.replace(plan, channels={**plan.channels, **found})
