"""SnapKV budgets per KV head, calibrated: the attention mass each head's kept keys hold at each
candidate budget, then the least lost mass at a mean budget."""

import pytest
import torch
from tiny_models import DEVICE, tiny_llama

from sparsecomp.calibration.eviction_budgets import calibrate_snapkv_budgets, snapkv_mass
from sparsecomp.patterns.snapkv import prompt_votes
from sparsecomp.plan import Rule

pytest.importorskip("transformers")


def test_kept_mass_matches_explicit_sets_and_grows_with_the_budget():
    b, hq, hkv, n, d, rows, window, scale = 1, 4, 2, 60, 8, 6, 8, 0.4
    q, k = torch.randn(b, hq, n, d), torch.randn(b, hkv, n, d)
    ratios = (0.1, 0.3, 1.0)
    got = snapkv_mass(q, k, ratios=ratios, window=window, observe=5, pool=3, rows=rows, scale=scale)
    prompt = n - rows
    (votes,) = prompt_votes(q[:, :, :prompt], k[:, :, :prompt], None, True, None, prompt, observe=5, pool=3,
                            scale=scale)  # fmt: skip
    for i, ratio in enumerate(ratios):
        voted = max(0, round(ratio * prompt) - window)
        for g in range(hkv):
            outside = [j for j in range(prompt) if j <= prompt - window]
            best = sorted(outside, key=lambda j: -votes[0, g, j].item())[:voted]
            kept = set(best) | set(range(prompt - window + 1, n))
            masses = []
            for h in range(g * 2, g * 2 + 2):
                for r in range(prompt, n):
                    w = torch.softmax((q[0, h, r].double() @ k[0, g, : r + 1].double().T) * scale, 0)
                    masses.append(sum(w[j] for j in kept if j <= r))
            torch.testing.assert_close(got[i, g], torch.stack(masses).mean(), rtol=1e-5, atol=1e-6)
    assert (got[1:] >= got[:-1] - 1e-9).all()  # more keys, more mass


def test_budgets_meet_the_mean_and_give_each_head_a_snapkv_rule():
    model = tiny_llama().eval()
    inputs = [torch.randint(1, 100, (160,), device=DEVICE) for _ in range(2)]
    plan = calibrate_snapkv_budgets(model, inputs, ratio=0.25, window=16, observe=8, pool=3, rows=8)
    rules = [r for site in plan.decode_sites.values() for r in site]
    assert len(plan.decode_sites) == 2 and len(rules) == 4
    assert all(r.kind == "snapkv" and dict(r.params)["window"] == 16 for r in rules)
    assert sum(dict(r.params)["ratio"] for r in rules) / len(rules) <= 0.25 + 1e-9
    with pytest.raises(ValueError, match="rows=32 must not exceed window=16"):
        calibrate_snapkv_budgets(model, inputs, window=16, rows=32)
    assert Rule.parse(rules[0].spec()) == rules[0]  # the plan's rules round-trip as text


def test_a_plan_of_per_head_budgets_decodes_from_a_plan_cache_as_over_a_full_cache():
    """Heads of one layer with different SnapKV budgets: the rule over a full static cache, and a
    PlanKVCache keeping each head's budget (a layer of head groups), give the same tokens."""
    from test_evicting_cache import full_and_kept

    import sparsecomp

    model = tiny_llama().eval()
    snap = "snapkv:window=4,observe=8,pool=1,ratio="  # pool=1: no equal votes at the budget's edge
    rules = [Rule.parse(snap + "0.25"), Rule.parse(snap + "0.125")]
    plan = sparsecomp.Plan(decode_sites={f"model.layers.{i}.self_attn": rules for i in range(2)})
    ids = torch.randint(1, 100, (1, 40), device=DEVICE)
    cache = sparsecomp.PlanKVCache(model, 64, plan)
    full, kept, _ = full_and_kept(model, plan, ids, cache, 64)
    assert [g.layer.slots for g in cache.layers[0].groups] == [16, 8]
    assert torch.equal(kept.sequences, full.sequences)
