"""Budgets per KV head for SnapKV, calibrated: how many keys each head keeps, under a mean budget.

Heads differ in how much of their attention a few voted keys hold (PyramidKV and Ada-KV allocate
by layer and by head for this reason). Measured on calibration inputs, each cut into a prompt and
the last ``rows`` queries after it (decode-like rows): per site and KV head, SnapKV's choice at
each candidate budget (the prompt's last ``observe`` queries vote, max-pooled over ``pool``; the
top-voted keys outside the window plus the window), and the attention mass the decode-like rows
put on those keys and on the rows after the prompt (which a window of at least ``rows`` keeps).
``allocate`` (the exact multiple-choice knapsack calibration uses for MoA) then picks each head's
budget: least summed lost mass at the mean ``ratio``. On SmolLM2 at 2K this did not beat one share
for every head (``benchmarks/results/decode_accuracy_budgets.md``).
"""

from __future__ import annotations

import dataclasses

import torch

from ..patterns.snapkv import prompt_votes
from ..plan import Plan, Rule
from .calibrate import allocate
from .observe import observe_prefill

CANDIDATES = (1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)  # shares of the keys a head may keep


def snapkv_mass(q, k, *, ratios, window: int, observe: int, pool: int, rows: int, scale: float) -> torch.Tensor:
    """(len(ratios), Hkv) float64: the attention mass the last ``rows`` queries of one causal input
    put on the keys SnapKV keeps at each budget (a share of the prompt: the input without those
    rows), plus the rows after the prompt; averaged over the rows and each KV group's query heads."""
    b, hq, n, d = q.shape
    hkv, prompt = k.shape[1], n - rows
    (votes,) = prompt_votes(q[:, :, :prompt], k[:, :, :prompt], None, True, None, prompt, observe=observe, pool=pool,
                            scale=scale)  # fmt: skip
    index = torch.arange(prompt, device=q.device)
    votes = votes.masked_fill(index > prompt - window, float("-inf"))  # the window is kept anyway
    scores = (q[:, :, prompt:].float() @ k.float().repeat_interleave(hq // hkv, 1).transpose(-1, -2)) * scale
    row = torch.arange(prompt, n, device=q.device)[:, None]
    weights = torch.softmax(scores.masked_fill(torch.arange(n, device=q.device) > row, float("-inf")), -1)
    after = weights[..., prompt:].sum(-1)  # (B, Hq, rows): the decoded keys, in the window
    masses = []
    for ratio in ratios:
        budget = max(1, round(ratio * prompt))
        voted = max(0, budget - window)
        kept = (index > prompt - window).expand(b, hkv, prompt).clone()
        if voted:
            top = votes.topk(min(voted, prompt), -1).indices
            kept.scatter_(-1, top, votes.gather(-1, top) > float("-inf"))
            kept |= index > prompt - window
        on_kept = (weights[..., :prompt] * kept.repeat_interleave(hq // hkv, 1)[:, :, None]).sum(-1)
        mass = (on_kept + after).double().mean((0, 2))  # (Hq,)
        masses.append(mass.view(hkv, hq // hkv).mean(1))
    return torch.stack(masses)


def calibrate_snapkv_budgets(
    model, inputs, plan=None, *, ratio: float = 0.0625, window: int = 64, observe: int = 32, pool: int = 7,
    rows: int = 32, candidates=CANDIDATES,
) -> Plan:  # fmt: skip
    """``plan`` (a Plan or preset; None: dense) whose decode rule per KV head of every attention site
    is ``snapkv`` with that head's calibrated share of the keys (``ratio`` on average over all KV
    heads of the model), measured on ``inputs`` (token-id tensors longer than ``rows`` + ``window``)."""
    if rows > window:
        raise ValueError(f"rows={rows} must not exceed window={window}: the rows after the prompt stay in the window")
    masses: dict[str, list[torch.Tensor]] = {}

    def observe_site(out, q, k, v, q_pos, k_pos, key_ok, *, site, scale, **structure):
        with torch.no_grad():
            mass = snapkv_mass(q.detach(), k.detach(), ratios=candidates, window=window, observe=observe, pool=pool,
                               rows=rows, scale=scale)  # fmt: skip
        masses.setdefault(site, []).append(mass.cpu())
        return out

    why = "give inputs longer than rows + window"
    observe_prefill(model, observe_site, inputs, shortest=rows + window + 1, why=why)
    if not masses:
        raise ValueError("no causal attention site was observed: nothing to calibrate")
    mean = {site: torch.stack(m).mean(0) for site, m in masses.items()}  # (candidates, Hkv)
    heads = [(site, h) for site, m in mean.items() for h in range(m.shape[1])]
    options = [[(c, 1.0 - float(mean[site][i, h])) for i, c in enumerate(candidates)] for site, h in heads]
    chosen = allocate(options, ratio)
    rules = {site: [None] * m.shape[1] for site, m in mean.items()}
    for (site, h), i in zip(heads, chosen, strict=True):
        rules[site][h] = Rule("snapkv", ratio=candidates[i], window=window, observe=observe, pool=pool)
    plan = Plan.from_any(plan)
    return dataclasses.replace(plan, decode_sites={**plan.decode_sites, **rules})
