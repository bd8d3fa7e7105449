"""DuoAttention's split calibrated for decoding: each KV head's attention mass within a streaming
window, the heads keeping the most of it streaming, the others dense; the plan then decodes with a
PlanKVCache that drops the streaming heads' past."""

import pytest
import torch
from tiny_models import DEVICE, tiny_llama

import sparsecomp
from sparsecomp.calibration.streaming_heads import streaming_head_mass, streaming_mass
from sparsecomp.plan import Rule

pytest.importorskip("transformers")


def test_streaming_mass_matches_loops_over_rows_and_keys():
    b, hq, hkv, n, d, sink, window, rows, scale = 2, 4, 2, 23, 8, 3, 5, 6, 0.4
    q, k = torch.randn(b, hq, n, d), torch.randn(b, hkv, n, d)
    key_ok = torch.ones(b, n, dtype=torch.bool)
    key_ok[1, :4] = False  # left padding: never attended
    got = streaming_mass(q, k, key_ok, sink=sink, window=window, rows=rows, scale=scale)
    want = torch.zeros(hkv, dtype=torch.float64)
    for g in range(hkv):
        masses = []
        for bi in range(b):
            for h in range(g * 2, g * 2 + 2):
                for i in range(n - rows, n):
                    seen = [j for j in range(i + 1) if key_ok[bi, j]]
                    w = torch.softmax(
                        torch.stack([q[bi, h, i].double() @ k[bi, g, j].double() * scale for j in seen]), 0
                    )
                    masses.append(sum(w[t] for t, j in enumerate(seen) if j < sink or j > i - window))
        want[g] = torch.stack(masses).mean()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_the_heads_keeping_the_most_mass_stream_and_decode_from_a_plan_cache():
    from test_evicting_cache import full_and_kept

    model = tiny_llama().eval()
    inputs = [torch.randint(1, 100, (40,), device=DEVICE) for _ in range(2)]
    kwargs = dict(sink=4, window=12, rows=8)
    mass = streaming_head_mass(model, inputs, **kwargs)
    assert sorted(mass) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    plan = sparsecomp.calibrate_streaming_heads(model, inputs, share=0.5, **kwargs)
    streaming = Rule.parse("streaming:sink=4,window=12")
    chosen = {(s, h) for s, rules in plan.decode_sites.items() for h, r in enumerate(rules) if r == streaming}
    ranked = sorted(((m.item(), s, h) for s, ms in mass.items() for h, m in enumerate(ms)), reverse=True)
    assert chosen == {(s, h) for _, s, h in ranked[:2]}
    assert all(r in (streaming, Rule()) for rules in plan.decode_sites.values() for r in rules)
    everything = sparsecomp.calibrate_streaming_heads(model, inputs, target=0.0, **kwargs)
    assert all(r == streaming for rules in everything.decode_sites.values() for r in rules)
    ids = torch.randint(1, 100, (1, 30), device=DEVICE)
    full, kept, _ = full_and_kept(model, plan, ids, sparsecomp.PlanKVCache(model, 54, plan), 54)
    assert torch.equal(kept.sequences, full.sequences)


def test_calibration_needs_one_selection_and_inputs_longer_than_the_window():
    model = tiny_llama().eval()
    inputs = [torch.randint(1, 100, (40,), device=DEVICE)]
    with pytest.raises(ValueError, match="give one of share, target"):
        sparsecomp.calibrate_streaming_heads(model, inputs, sink=4, window=12)
    with pytest.raises(ValueError, match="longer than sink \\+ window"):
        sparsecomp.calibrate_streaming_heads(model, inputs, sink=4, window=64, share=0.5)
