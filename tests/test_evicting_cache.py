"""Eviction by importance: a cache that keeps only the keys a SnapKV or H2O decode rule reads (k per
KV head) must give the tokens of the same rule over a full static cache, in a fixed memory."""

import pytest
import torch
from test_generate import assert_same_generation
from tiny_models import DEVICE, tiny_llama

import sparsecomp
from sparsecomp.plan import Plan, Rule

pytest.importorskip("transformers")

NEW = 24  # every slot outside the window is replaced more than once at k=12

# pool=1: no max-pooled plateaus, so no equal votes at the budget's edge (ties: the module docstring)
RULES = [
    "h2o:k=12,window=4",
    "snapkv:k=12,window=4,observe=8,pool=1",
    "snapkv:k=12,window=4,observe=8,pool=1,decoded=kept",
    "h2o:k=3,window=8",  # a budget below the window: all window
]


def generate_with(model, ids, cache):
    return model.generate(
        ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=NEW, do_sample=False,
        pad_token_id=0, return_dict_in_generate=True, output_logits=True,
    )  # fmt: skip


def full_and_kept(model, plan, ids, cache, length: int):
    """(generation over a full static cache of ``length``, generation over ``cache``, the model
    compiled for the latter), each from a fresh compile of ``plan``."""
    from transformers import StaticCache

    compiled = sparsecomp.compile(model, plan, inner="eager", cost_model=False)
    full = generate_with(compiled, ids, StaticCache(config=model.config, max_cache_len=length))
    torch._dynamo.reset()
    compiled = sparsecomp.compile(model, plan, inner="eager", cost_model=False)
    return full, generate_with(compiled, ids, cache), compiled


def evicting(model, length, rule, **kwargs):
    return sparsecomp.EvictingKVCache(config=model.config, max_cache_len=length, rule=rule, **kwargs)


def sparsecomp_model():
    return tiny_llama().eval()  # the cache switches it to sparsecomp_sdpa while attached


@pytest.mark.parametrize("prompt_len", [30, 7])  # longer than the budget, shorter than budget - window
@pytest.mark.parametrize("rule", RULES)
def test_evicting_cache_generates_the_tokens_of_the_rule_on_a_full_cache(rule, prompt_len):
    model = sparsecomp_model()
    ids = torch.randint(1, 100, (2, prompt_len), device=DEVICE)
    length = prompt_len + NEW
    cache = evicting(model, length, rule, batch_size=2, dtype=torch.float32, device=DEVICE)
    full, kept, compiled = full_and_kept(model, Plan(decode_default=Rule.parse(rule)), ids, cache, length)
    slots = cache.layers[0].slots
    assert cache.layers[0].keys.shape == (2, 2, slots, 16) and slots == dict(Rule.parse(rule).params)["k"]
    assert torch.equal(kept.sequences, full.sequences)
    assert_same_generation(kept, full, atol=1e-5)
    graphs = sparsecomp.inspect(compiled).graphs
    assert len(graphs) == 2  # the prompt's graph and one for every step
    assert all(s.became == "kept" and "EvictingKVCache" in s.reason for s in graphs[1].sites)
    # without compiling, the same cache is the same rule: HF's SDPA over the kept keys
    with (cache := evicting(model, length, rule)).attached(model):
        eager = generate_with(model, ids, cache)
    assert_same_generation(eager, full, atol=1e-5)


def test_held_slots_are_the_rule_s_window_and_its_top_ranked_keys():
    """After each step of H2O: the window's keys, and every other key held has a rank at least that
    of any key dropped since (the lowest goes first)."""
    model = sparsecomp_model()
    ids = torch.randint(1, 100, (1, 20), device=DEVICE)
    cache = evicting(model, 40, "h2o:k=8,window=3")
    with cache.attached(model), torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True)
        layer = cache.layers[1]
        assert sorted(layer.position[0, 0].tolist())[-2:] == [18, 19]  # the window but the next key's place
        for step in range(10):
            token = out.logits[:, -1:].argmax(-1)
            before = layer.rank.clone(), layer.position.clone()
            out = model(token, past_key_values=cache, use_cache=True)
            position = 20 + step
            held = layer.position[0]
            assert (held == position).sum(-1).tolist() == [1, 1]
            assert all({position - 2, position - 1, position} <= set(h.tolist()) for h in held)
            rank, previous = before
            for h in range(2):
                dropped = set(previous[0, h].tolist()) - set(held[h].tolist())
                if step == 0:  # the prompt left one slot empty: the first step's key takes it
                    assert dropped == {-1}
                    continue
                assert len(dropped) == 1
                (gone,) = dropped
                outside = (previous[0, h] <= position - 3) & (previous[0, h] >= 0)
                assert rank[0, h][previous[0, h] == gone] == rank[0, h][outside].min()


def test_memory_is_the_budget_whatever_the_length():
    from sparsecomp.runtime.kv_memory import kv_memory

    model = sparsecomp_model()
    cache = evicting(model, 4096, "snapkv:ratio=0.0625,window=16", batch_size=1, dtype=torch.float32, device=DEVICE)
    report = kv_memory(cache)
    per_layer = 2 * 2 * 256 * 16 * 4  # K and V, 2 KV heads, 4096 / 16 slots, head_dim 16, fp32
    ranks = 2 * 256 * (4 + 8)  # a float32 rank and an int64 position per slot and KV head
    kv = [row.kv_gpu + row.kv_host for row in report.layers]  # the host's on a CPU run
    assert kv == [per_layer] * 2 and [row.state_gpu for row in report.layers] == [ranks] * 2
    assert report.total("dense") == 16 * sum(kv)
    allocated = sum(t.numel() * t.element_size() for layer in cache.layers
                    for t in (layer.keys, layer.values, layer.rank, layer.position))  # fmt: skip
    assert sum(kv) + report.total("state_gpu") == allocated


def test_half_the_layers_evicting_beside_a_full_one():
    """One layer keeps H2O's keys, the other the whole past for Double Sparsity: the tokens of that
    plan over a full static cache."""
    from test_decode_rules import decode_plan

    model = sparsecomp_model()
    rule = "h2o:k=10,window=4"
    plan = Plan(
        decode_default=Rule.parse(rule),
        decode_sites={"model.layers.0.self_attn": Rule.parse("double_sparsity:channels=4,k=8")},
        channels=decode_plan(rule).channels,
    )
    ids = torch.randint(1, 100, (2, 30), device=DEVICE)
    length = 30 + NEW
    cache = evicting(model, length, rule, layers=[1], batch_size=2, dtype=torch.float32, device=DEVICE)
    full, kept, _ = full_and_kept(model, plan, ids, cache, length)
    assert cache.layers[1].keys.shape[2] == 10 and cache.layers[0].keys.shape[2] == length
    assert torch.equal(kept.sequences, full.sequences)


def test_wrong_plans_models_and_inputs_are_refused():
    model = sparsecomp_model()
    ids = torch.randint(1, 100, (2, 12), device=DEVICE)
    rule = "h2o:k=8,window=4"
    compiled = sparsecomp.compile(model, Plan(decode_default=Rule.parse("h2o:k=9,window=4")), inner="eager")
    with pytest.raises(ValueError, match="EvictingKVCache keeps other keys .*k=9"):
        generate_with(compiled, ids, evicting(model, 40, rule))
    compiled = sparsecomp.compile(model, Plan(decode_default=Rule.parse(rule)), inner="eager")
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with pytest.raises(ValueError, match="does not take padded batches"):
        compiled.generate(ids, attention_mask=mask, past_key_values=evicting(model, 40, rule), max_new_tokens=2)
    with pytest.raises(RuntimeError, match="never chosen"):  # not attached: decoding would read empty slots
        cache = evicting(model, 40, rule)
        out = model(ids, past_key_values=cache, use_cache=True)
        model(out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="EvictingKVCache keeps the keys of a snapkv or h2o rule"):
        evicting(model, 40, "streaming:sink=4,window=8")
