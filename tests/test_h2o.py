"""H2O: the prompt's accumulated attention, then each decode step keeps the heavy hitters and the
recent window, adds its own weights and evicts the rest for good. The pattern's functions against a
plain H2O written with Python sets, then through generate (without a static cache: test_snapkv)."""

import pytest
import torch
from test_generate import assert_same_generation
from test_snapkv import generate, votes_by_loops
from tiny_models import DEVICE, tiny_llama

from sparsecomp.patterns import h2o
from sparsecomp.patterns.h2o import H2O, prompt_attention
from sparsecomp.plan import Plan, Rule


@pytest.mark.parametrize("padded", [False, True])
def test_prompt_attention_sums_every_query_in_chunks(padded, monkeypatch):
    monkeypatch.setattr(h2o, "_CHUNK_ELEMENTS", 2 * 4 * 13 * 3)  # chunks of 3 query rows
    b, hq, hkv, nq, d = 2, 4, 2, 13, 8
    q, k = torch.randn(b, hq, nq, d), torch.randn(b, hkv, nq, d)
    seen = torch.ones(nq, nq, dtype=torch.bool).tril().expand(b, nq, nq).clone()
    if padded:
        seen[0, :, :2] = False
    (total,) = prompt_attention(q, k, seen[:, None] if padded else None, True, None, nq + 5, scale=0.3)
    assert torch.isneginf(total[..., nq:]).all()
    torch.testing.assert_close(total[..., :nq].double(), votes_by_loops(q, k, seen, nq, 1, 0.3), rtol=1e-5, atol=1e-5)


def h2o_by_sets(q_steps, keys, prompt_scores, budget, window, scale):
    """One KV head's H2O with explicit sets: per step, (kept keys, accumulated scores after it)."""
    n_prompt = prompt_scores.shape[0]
    scores = torch.cat([prompt_scores.double(), torch.zeros(len(q_steps), dtype=torch.float64)])
    present, each = set(range(n_prompt)), []
    for step, rows in enumerate(q_steps):  # rows: (G, D) the step's query heads of this group
        p = n_prompt + step
        present.add(p)
        recent = {j for j in present if j > p - window}
        pool = sorted(present - recent, key=lambda j: -scores[j].item())
        present = recent | set(pool[: budget - window])
        kept = sorted(present)
        scores[kept] += torch.softmax((rows.double() @ keys[kept].double().T) * scale, -1).sum(0)
        each.append((set(kept), scores.clone()))
    return each


def test_steps_keep_heavy_hitters_and_the_window_and_evict_for_good():
    hq, hkv, d, n_prompt, steps, budget, window, scale = 4, 2, 8, 20, 12, 9, 3, 0.35
    n = n_prompt + steps
    keys, prompt_q = torch.randn(1, hkv, n, d), torch.randn(1, hq, n_prompt, d)
    q_steps = torch.randn(steps, 1, hq, 1, d)
    (state,) = prompt_attention(prompt_q, keys[:, :, :n_prompt], None, True, None, n, scale=scale)
    group = hq // hkv
    want = [h2o_by_sets(q_steps[:, 0, h * group : (h + 1) * group, 0], keys[0, h], state[0, h, :n_prompt],
                        budget, window, scale) for h in range(hkv)]  # fmt: skip
    params = dict(ratio=0.0, k=budget, window=window)
    for step in range(steps):
        p = n_prompt + step
        key_ok = torch.arange(n)[None] <= p
        state[..., p] = 0.0  # the step's key, as the cache's update writes it
        tokens = H2O.select_from(q_steps[step], (state,), keys, key_ok, None, None, **params)
        (state,) = H2O.observe_step(q_steps[step], (state,), keys, tokens, key_ok, None, scale, **params)
        for h in range(hkv):
            kept, scores = want[h][step]
            assert {t for t in tokens[0, h].tolist() if t >= 0} == kept
            assert len(kept) == budget
            torch.testing.assert_close(state[0, h, sorted(kept)].double(), scores[sorted(kept)], rtol=1e-5, atol=1e-5)
            assert torch.isneginf(state[0, h, [j for j in range(p + 1) if j not in kept]]).all()


def test_a_budget_covering_every_key_decodes_as_dense_and_a_small_one_does_not():
    pytest.importorskip("transformers")
    model = tiny_llama().eval()
    ids = torch.randint(1, 100, (2, 30), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding: never attended, never kept
    dense, _ = generate(model, "dense", ids, mask)
    out, report = generate(model, Plan(decode_default=Rule.parse("h2o:k=64,window=8")), ids, mask)
    assert [s.became for s in report.graphs[-1].sites] == ["sparse_decode"] * 2
    assert_same_generation(out, dense, atol=1e-5)
    out, report = generate(model, Plan(decode_default=Rule.parse("h2o:k=10,window=4")), ids, mask)
    assert not torch.allclose(out.logits[-1], dense.logits[-1], atol=1e-3)
    for (scores,) in report.states.tensors.values():  # after the last step: exactly its 10 keys kept
        assert (torch.isfinite(scores).sum(-1) == 10).all()
