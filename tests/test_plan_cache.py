"""A cache made for a plan keeps, per layer and KV head, only the keys the plan's decode rules read:
DuoAttention's retrieval (dense) and streaming heads in one layer, SnapKV / H2O heads beside them.
Each must give the tokens of the same plan over a full static cache, in less memory."""

import pytest
import torch
from test_evicting_cache import NEW, full_and_kept, generate_with
from test_generate import assert_same_generation
from tiny_models import DEVICE, tiny_llama

import sparsecomp
from sparsecomp.plan import Plan, Rule

pytest.importorskip("transformers")

STREAMING = Rule.parse("streaming:sink=4,window=12")
DENSE = Rule()
H2O = Rule.parse("h2o:k=10,window=4")


def sparsecomp_model():
    return tiny_llama().eval()  # 2 layers, 4 query / 2 KV heads; sparsecomp_sdpa while the cache is attached


def per_head(rules) -> Plan:
    """Plan giving every layer these decode rules, one per KV head."""
    return Plan(decode_sites={f"model.layers.{i}.self_attn": list(rules) for i in range(2)})


def plan_cache(model, length, plan, **kwargs):
    return sparsecomp.PlanKVCache(model, length, plan, **kwargs)


PLANS = {
    # DuoAttention: in each layer one retrieval (dense) and one streaming KV head
    "retrieval and streaming heads": per_head([DENSE, STREAMING]),
    # a streaming head beside an H2O head in layer 0; layer 1 all streaming (a ring of its own)
    "streaming and h2o heads": Plan(
        decode_default=STREAMING, decode_sites={"model.layers.0.self_attn": [H2O, STREAMING]}
    ),
}


@pytest.mark.parametrize("name", sorted(PLANS))
def test_plan_cache_generates_the_plan_s_tokens_of_a_full_cache(name):
    plan = PLANS[name]
    model = sparsecomp_model()
    ids = torch.randint(1, 100, (2, 30), device=DEVICE)
    length = 30 + NEW
    cache = plan_cache(model, length, plan, batch_size=2, dtype=torch.float32, device=DEVICE)
    full, kept, compiled = full_and_kept(model, plan, ids, cache, length)
    assert torch.equal(kept.sequences, full.sequences)
    assert_same_generation(kept, full, atol=1e-5)
    graphs = sparsecomp.inspect(compiled).graphs
    assert len(graphs) == 2  # the prompt's graph and one for every step
    groups = [s for s in graphs[1].sites if s.form == "cache_group"]
    assert groups and all(s.became == "kept" and "per-head cache layer" in s.reason for s in groups)


def test_streaming_heads_take_their_share_of_the_memory_away():
    from sparsecomp.runtime.kv_memory import kv_memory

    model = sparsecomp_model()
    length = 1024
    plan = PLANS["retrieval and streaming heads"]
    cache = plan_cache(model, length, plan, batch_size=1, dtype=torch.float32, device=DEVICE)
    report = kv_memory(cache)
    per_head = 2 * 16 * 4  # K and V of one token, one KV head, head_dim 16, fp32
    kv = [row.kv_gpu + row.kv_host for row in report.layers]  # the host's on a CPU run
    assert kv == [per_head * (length + STREAMING.sink + STREAMING.window)] * 2
    assert report.total("dense") == 2 * per_head * length * 2
    sizes = [(g.keeps, g.layer.keys.shape[2]) for g in cache.layers[0].groups]
    assert sizes == [("dense", length), (str(STREAMING), 16)]


def test_plans_a_cache_cannot_keep_are_refused():
    model = sparsecomp_model()
    with pytest.raises(ValueError, match="read every key at every layer"):
        plan_cache(model, 64, Plan(decode_default=Rule.parse("double_sparsity:channels=4,k=8")))
    ds = Rule.parse("double_sparsity:channels=4,k=8")
    with pytest.raises(ValueError, match="mixes evicted heads with .*double_sparsity"):
        plan_cache(model, 64, per_head([ds, STREAMING]))
    with pytest.raises(ValueError, match="share KV head 0"):
        plan_cache(model, 64, per_head([DENSE, STREAMING, STREAMING, STREAMING]))
    cache = plan_cache(model, 64, PLANS["retrieval and streaming heads"])
    other = per_head([DENSE, Rule.parse("streaming:sink=4,window=8")])
    compiled = sparsecomp.compile(model, other, inner="eager", cost_model=False)
    with pytest.raises(ValueError, match="PlanKVCache keeps other keys .*window=8"):
        generate_with(compiled, torch.randint(1, 100, (1, 8), device=DEVICE), cache)


def test_steps_over_head_groups_and_evicting_layers_replay_as_graphs():
    """The step-graph plumbing on CPU (test_step_graphs.RerunGraph): a cache of head groups and an
    evicting layer changes only tensors in place while decoding, so its steps are captured and
    replayed, with the tokens of the plain compiled steps."""
    from test_step_graphs import RerunGraph

    from sparsecomp.runtime.step_graphs import graphable_cache

    plan = PLANS["streaming and h2o heads"]
    model = sparsecomp_model()
    ids = torch.randint(1, 100, (1, 30), device=DEVICE)
    length = 30 + NEW
    compiled = sparsecomp.compile(model, plan, inner="eager", cost_model=False)
    plain = generate_with(compiled, ids, plan_cache(model, length, plan))
    torch._dynamo.reset()
    compiled = sparsecomp.compile(model, plan, inner="eager", cost_model=False, cuda_graphs=True)
    steps = compiled.generate.compiled_forward
    steps.graph_type = RerunGraph
    cache = plan_cache(model, length, plan)
    graphed = generate_with(compiled, ids, cache)
    assert graphable_cache(cache)
    assert steps.captured == 1 and steps.replayed == NEW - 3, steps.reasons  # step 1 compiles, 2 captures
    assert torch.equal(graphed.sequences, plain.sequences)
