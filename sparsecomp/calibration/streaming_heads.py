"""DuoAttention's split, calibrated for decoding: which KV heads can decode with a StreamingLLM window
(keeping only sink + window keys, so that ``sparsecomp.PlanKVCache`` drops the rest of their cache)
and which must keep the whole past (retrieval heads).

Measured on calibration inputs: per site and KV head, the attention mass the last ``rows`` queries
of each input (the positions that see the most past, as decode steps do) put on the keys a
``streaming(sink, window)`` rule keeps, averaged over those rows and the KV group's query heads,
and its least over the inputs: a head streams only if it keeps the mass on every input. Retrieval
heads show on retrieval inputs (DuoAttention calibrates on synthetic pass key retrieval; ordinary
text alone misses them: on SmolLM2 a split chosen from text alone lost two of three pass keys,
``benchmarks/results/decode_accuracy_duo.md``), so give both. The heads holding the most stream:
those at or above ``target``, or the ``share`` of all KV heads of the model holding the most
(DuoAttention's sparsity knob; a model-wide ranking, so layers differ in how many of their heads
stream).
"""

from __future__ import annotations

import dataclasses

import torch

from ..plan import Plan, Rule
from .observe import observe_prefill


def streaming_mass(q, k, key_ok, *, sink: int, window: int, rows: int, scale: float) -> torch.Tensor:
    """(Hkv,) float64: the share of the last ``rows`` queries' attention (causal; key_ok (B, N) or
    None) on the first ``sink`` keys and the last ``window`` up to each query, averaged over those
    rows, the batch and each KV group's query heads."""
    b, hq, n, _ = q.shape
    hkv = k.shape[1]
    first = n - min(rows, n)
    scores = (q[:, :, first:].float() @ k.float().repeat_interleave(hq // hkv, 1).transpose(-1, -2)) * scale
    query = torch.arange(first, n, device=q.device)[:, None]
    key = torch.arange(n, device=q.device)[None]
    seen = key <= query
    if key_ok is not None:
        seen = seen & key_ok[:, None, None, :]
    weights = torch.softmax(scores.masked_fill(~seen, float("-inf")), -1).nan_to_num(0.0)
    kept = (key < sink) | (key > query - window)
    mass = (weights * kept).sum(-1).double()  # (B, Hq, R)
    return mass.mean((0, 2)).view(hkv, hq // hkv).mean(1)


def streaming_head_mass(model, inputs, *, sink: int = 64, window: int = 1024, rows: int = 32) -> dict:
    """``{site: (Hkv,) float64}``: each KV head's attention mass within ``streaming(sink, window)``
    over the last ``rows`` queries of each input (token-id tensors, (N,) or (B, N)), the least
    over the inputs."""
    masses: dict[str, list[torch.Tensor]] = {}

    def observe(out, q, k, v, q_pos, k_pos, key_ok, *, site, scale, **structure):
        with torch.no_grad():
            mass = streaming_mass(q.detach(), k.detach(), key_ok, sink=sink, window=window, rows=rows, scale=scale)
        masses.setdefault(site, []).append(mass.cpu())
        return out

    why = f"streaming(sink={sink}, window={window}) keeps all of it; give inputs longer than sink + window"
    observe_prefill(model, observe, inputs, shortest=sink + window + 1, why=why)
    if not masses:
        raise ValueError("no causal attention site was observed: nothing to calibrate")
    return {site: torch.stack(m).amin(0) for site, m in masses.items()}


def calibrate_streaming_heads(
    model, inputs, plan=None, *, sink: int = 64, window: int = 1024, share: float | None = None,
    target: float | None = None, rows: int = 32,
) -> Plan:  # fmt: skip
    """``plan`` (a Plan or preset; None: dense) whose decode rule per KV head is
    ``streaming(sink, window)`` for the heads that keep the most attention within it (``target``:
    those at or above that mass; ``share``: that share of all KV heads, the highest first) and
    ``dense`` for the others (retrieval heads), at every attention site, measured on ``inputs``
    (token-id tensors: ordinary text and retrieval prompts, see the module docstring). Give one of
    ``share``, ``target``."""
    if (share is None) == (target is None):
        raise ValueError(f"give one of share, target; got share={share}, target={target}")
    if share is not None and not 0 <= share <= 1:
        raise ValueError(f"share={share}; give a share of the KV heads in [0, 1]")
    mass = streaming_head_mass(model, inputs, sink=sink, window=window, rows=rows)
    if share is not None:
        ranked = sorted(((m.item(), site, h) for site, ms in mass.items() for h, m in enumerate(ms)), reverse=True)
        streaming = {(site, h) for _, site, h in ranked[: round(share * len(ranked))]}
    else:
        streaming = {(site, h) for site, ms in mass.items() for h, m in enumerate(ms) if m >= target}
    rule = Rule("streaming", sink=sink, window=window)
    sites = {site: [rule if (site, h) in streaming else Rule() for h in range(len(ms))] for site, ms in mass.items()}
    plan = Plan.from_any(plan)
    return dataclasses.replace(plan, decode_sites={**plan.decode_sites, **sites})
