"""SnapKV: the prompt's last queries vote for keys once, at prefill; each decode step attends to the
top-voted keys and a recent window. Votes and selection against plain loops, then through generate."""

import pytest
import torch
from test_generate import assert_same_generation
from tiny_models import DEVICE, tiny_llama

import sparsecomp
from sparsecomp.patterns.snapkv import SNAPKV, prompt_votes
from sparsecomp.plan import Plan, Rule


def votes_by_loops(q, k, seen, observe, pool, scale):
    """Per KV head: for each of the last ``observe`` queries of each of its query heads, the softmax
    over the keys it sees, summed; then the max over each key's ``pool`` neighbours."""
    b, hq, nq, _ = q.shape
    hkv, n = k.shape[1], k.shape[2]
    out = torch.zeros(b, hkv, n, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            for i in range(nq - observe, nq):
                if not seen[bi, i].any():  # a padding row that sees no key votes for none
                    continue
                s = (q[bi, h, i].double() @ k[bi, h // (hq // hkv)].double().T) * scale
                s[~seen[bi, i]] = float("-inf")
                out[bi, h // (hq // hkv)] += torch.softmax(s, -1)
    pooled = torch.stack([out[..., max(0, j - pool // 2) : j + pool // 2 + 1].amax(-1) for j in range(n)], -1)
    return pooled.masked_fill(~seen[:, nq - observe :].any(1)[:, None], float("-inf"))


@pytest.mark.parametrize("padded", [False, True])
def test_prompt_votes_match_loops_over_heads_and_observed_queries(padded):
    b, hq, hkv, nq, d, n_state = 2, 4, 2, 11, 16, 20
    q, k = torch.randn(b, hq, nq, d), torch.randn(b, hkv, nq, d)
    seen = torch.ones(nq, nq, dtype=torch.bool).tril().expand(b, nq, nq).clone()
    if padded:
        seen[1, :, :3] = False  # the second row's first three keys are padding
    (votes,) = prompt_votes(q, k, seen[:, None] if padded else None, True, None, n_state,
                            observe=4, pool=3, scale=0.25)  # fmt: skip
    assert votes.shape == (b, hkv, n_state) and torch.isneginf(votes[..., nq:]).all()
    torch.testing.assert_close(votes[..., :nq].double(), votes_by_loops(q, k, seen, 4, 3, 0.25))
    if padded:
        assert torch.isneginf(votes[1, :, :3]).all() and torch.isfinite(votes[0]).any()


def test_selection_lists_the_window_and_the_top_voted_keys_before_it_once():
    n, window, k = 40, 6, 14
    votes = torch.randn(1, 2, n)
    votes[:, :, 30:] = float("-inf")  # keys written after the prompt: no votes
    votes[:, 1, :25] = float("-inf")  # head 1: only 5 voted keys
    key_ok = torch.zeros(1, n, dtype=torch.bool)
    key_ok[:, :35] = True  # the step's key is 34
    keys = torch.randn(1, 2, n, 8)
    tokens = SNAPKV.select_from(torch.randn(1, 4, 1, 8), (votes,), keys, key_ok, None, None,
                                ratio=0.0, k=k, window=window)  # fmt: skip
    assert tokens.shape == (1, 2, k)
    for h in range(2):
        listed = [t for t in tokens[0, h].tolist() if t >= 0]
        assert len(listed) == len(set(listed))
        recent = set(range(35 - window, 35))
        voted = votes[0, h].clone()
        voted[35 - window :] = float("-inf")
        best = voted.topk(k - window).indices.tolist()
        want = recent | {j for j in best if voted[j] > float("-inf")}
        assert set(listed) == want


def test_a_budget_below_the_window_is_the_budget_s_last_keys():
    votes, keys = torch.randn(1, 2, 40), torch.randn(1, 2, 40, 8)
    key_ok = torch.arange(40)[None] < 30  # the step's key is 29
    tokens = SNAPKV.select_from(torch.randn(1, 4, 1, 8), (votes,), keys, key_ok, None, None, ratio=0.0, k=5,
                                window=8)  # fmt: skip
    assert tokens.shape == (1, 2, 5) and all(sorted(t) == list(range(25, 30)) for t in tokens[0].tolist())


def test_decoded_kept_lists_the_keys_written_while_decoding_before_any_prompt_key():
    votes, keys = torch.randn(1, 2, 40), torch.randn(1, 2, 40, 8)
    votes[:, :, 30:] = float("inf")  # keys 30-37 written by decode steps (decoded="kept"), 38-39 not yet
    key_ok = torch.arange(40)[None] < 38  # the step's key is 37: the window is 34-37
    tokens = SNAPKV.select_from(torch.randn(1, 4, 1, 8), (votes,), keys, key_ok, None, None, ratio=0.0, k=10,
                                window=4, decoded="kept")  # fmt: skip
    for h in range(2):
        best_prompt = set(votes[0, h, :30].topk(2).indices.tolist())
        assert set(tokens[0, h].tolist()) == set(range(30, 38)) | best_prompt
    tokens = SNAPKV.select_from(torch.randn(1, 4, 1, 8), (votes,), keys, key_ok, None, None, ratio=0.0, k=7,
                                window=4, decoded="kept")  # fmt: skip
    assert all(set(t) == set(range(31, 38)) for t in tokens[0].tolist())  # the most recent decoded first
    (fresh,) = SNAPKV.summarize(keys, None, None, decoded="kept")
    assert torch.isposinf(fresh).all()


def generate(model, plan, ids, mask, new=6):
    from transformers import StaticCache

    compiled = sparsecomp.compile(model, plan, inner="eager", cost_model=False)
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + new)
    out = compiled.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=new, do_sample=False,
                            pad_token_id=0, return_dict_in_generate=True, output_logits=True)  # fmt: skip
    return out, sparsecomp.inspect(compiled)


def test_a_budget_covering_every_key_decodes_as_dense_and_a_small_one_does_not():
    pytest.importorskip("transformers")
    model = tiny_llama().eval()
    ids = torch.randint(1, 100, (2, 30), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding: its keys get no votes
    dense, _ = generate(model, "dense", ids, mask)
    covering = Plan(decode_default=Rule.parse("snapkv:k=64,window=8,observe=4,pool=3"))
    out, report = generate(model, covering, ids, mask)
    assert [s.became for s in report.graphs[-1].sites] == ["sparse_decode"] * 2
    assert "state kept beside the static cache" in report.graphs[-1].sites[0].reason
    assert_same_generation(out, dense, atol=1e-5)  # every key listed once: the dense softmax
    kept = Plan(decode_default=Rule.parse("snapkv:k=64,window=8,observe=4,pool=3,decoded=kept"))
    assert_same_generation(generate(model, kept, ids, mask)[0], dense, atol=1e-5)
    small = Plan(decode_default=Rule.parse("snapkv:k=10,window=4,observe=4,pool=3"))
    out, _ = generate(model, small, ids, mask)
    assert not torch.allclose(out.logits[-1], dense.logits[-1], atol=1e-3)


@pytest.mark.parametrize("rule", ["snapkv:k=8,window=4", "h2o:k=8,window=4"])
def test_without_a_static_cache_the_decode_steps_keep_their_attention_and_say_why(rule):
    pytest.importorskip("transformers")
    model = tiny_llama().eval()
    ids = torch.randint(1, 100, (1, 20), device=DEVICE)
    compiled = sparsecomp.compile(model, Plan(decode_default=Rule.parse(rule)), inner="eager", cost_model=False)
    compiled.generate(ids, max_new_tokens=3, do_sample=False)  # a DynamicCache: no prompt state
    decode = sparsecomp.inspect(compiled).graphs[-1].sites
    assert {s.became for s in decode} == {"kept"} and "needs a static cache" in decode[0].reason


def test_snapkv_pools_over_an_odd_count():
    with pytest.raises(ValueError, match="pool must be odd"):
        Rule.parse("snapkv:k=8,pool=4")
