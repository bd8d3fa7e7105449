"""Eviction for streaming heads: a cache that keeps only the sink and window keys (a ring) must give
the tokens of the same streaming plan over a full static cache, in a fixed memory."""

import pytest
import torch
from test_decode_rules import decode_plan
from test_generate import assert_same_generation
from tiny_models import DEVICE, tiny_llama

import sparsecomp

pytest.importorskip("transformers")

SINK, WINDOW = 4, 16
RULE = f"streaming:sink={SINK},window={WINDOW}"
NEW = 30  # the ring (20 slots) wraps more than once


def generate_with(model, ids, cache, mask=None):
    mask = torch.ones_like(ids) if mask is None else mask
    return model.generate(
        ids, attention_mask=mask, past_key_values=cache, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
        return_dict_in_generate=True, output_logits=True,
    )  # fmt: skip


def ring(model, length, **kwargs):
    return sparsecomp.StreamingKVCache(config=model.config, max_cache_len=length, sink=SINK, window=WINDOW, **kwargs)


@pytest.mark.parametrize("prompt_len", [30, 9])  # longer than the ring (kept in part), shorter
def test_ring_generates_the_tokens_of_the_streaming_rule_on_a_full_cache(prompt_len):
    from transformers import StaticCache

    model = tiny_llama().eval()
    ids = torch.randint(1, 100, (2, prompt_len), device=DEVICE)
    length = prompt_len + NEW
    compiled = sparsecomp.compile(model, decode_plan(RULE), inner="eager", cost_model=False)
    full = generate_with(compiled, ids, StaticCache(config=model.config, max_cache_len=length))
    torch._dynamo.reset()
    compiled = sparsecomp.compile(model, decode_plan(RULE), inner="eager", cost_model=False)
    cache = ring(model, length, batch_size=2, dtype=torch.float32, device=DEVICE)
    evicted = generate_with(compiled, ids, cache)
    assert cache.layers[0].keys.shape[2] == SINK + WINDOW and cache.get_seq_length() == length - 1
    assert torch.equal(evicted.sequences, full.sequences)
    assert_same_generation(evicted, full, atol=1e-5)
    graphs = sparsecomp.inspect(compiled).graphs
    assert len(graphs) == 2  # the prompt's graph and one decode graph for every step
    # without compiling, the ring is StreamingLLM too: HF's own SDPA over the kept keys
    eager = generate_with(model, ids, ring(model, length))
    assert_same_generation(eager, full, atol=1e-5)


@pytest.mark.parametrize("ring_layer", [0, 1])
def test_rings_for_some_layers_give_the_tokens_of_a_plan_mixing_streaming_and_full_layers(ring_layer):
    """Half the layers streaming (their K/V in a ring), the others reading the whole past with Double
    Sparsity: the same tokens as that plan over a full static cache."""
    from transformers import StaticCache

    from sparsecomp.plan import Plan, Rule
    from sparsecomp.runtime.streaming_cache import SLICING_ATTENTION

    model = tiny_llama().eval()
    model.set_attn_implementation(SLICING_ATTENTION)  # the shared mask is cut to each layer's keys
    full_layer = 1 - ring_layer
    plan = Plan(
        decode_default=Rule.parse(RULE),
        decode_sites={f"model.layers.{full_layer}.self_attn": Rule.parse("double_sparsity:channels=4,k=8")},
        channels=decode_plan(RULE).channels,
    )
    ids = torch.randint(1, 100, (2, 30), device=DEVICE)
    length = 30 + NEW
    compiled = sparsecomp.compile(model, plan, inner="eager", cost_model=False)
    full = generate_with(compiled, ids, StaticCache(config=model.config, max_cache_len=length))
    torch._dynamo.reset()
    compiled = sparsecomp.compile(model, plan, inner="eager", cost_model=False)
    cache = ring(model, length, layers=[ring_layer], batch_size=2, dtype=torch.float32, device=DEVICE)
    evicted = generate_with(compiled, ids, cache)
    assert cache.layers[ring_layer].keys.shape[2] == SINK + WINDOW and cache.layers[full_layer].keys.shape[2] == length
    assert torch.equal(evicted.sequences, full.sequences)
    assert_same_generation(evicted, full, atol=1e-5)
    decode = sparsecomp.inspect(compiled).graphs[-1].sites
    assert {s.became for s in decode} == {"sparse_attention", "sparse_decode"}  # both rules ran sparse

    # the cache switches the model to sparsecomp_sdpa while generate runs, and back
    model.set_attn_implementation("sdpa")
    torch._dynamo.reset()
    compiled = sparsecomp.compile(model, plan, inner="eager", cost_model=False)
    switched = generate_with(compiled, ids, ring(model, length, layers=[ring_layer]))
    assert torch.equal(switched.sequences, full.sequences) and model.config._attn_implementation == "sdpa"


def test_ring_memory_is_counted_from_its_tensors_against_a_full_static_cache():
    from transformers import StaticCache

    from sparsecomp.runtime.kv_memory import kv_memory

    model = tiny_llama().eval()
    length = 200
    cache = ring(model, length, batch_size=2, dtype=torch.float32, device=DEVICE)
    full = StaticCache(config=model.config, max_cache_len=length)
    full.early_initialization(2, 2, 16, torch.float32, torch.device(DEVICE))

    def allocated(c):
        return sum(t.numel() * t.element_size() for layer in c.layers for t in (layer.keys, layer.values))

    def kv(report):  # a CPU model's cache counts as host memory
        return report.total("kv_gpu") + report.total("kv_host")

    report = kv_memory(cache)
    assert kv(report) == allocated(cache) == 2 * 2 * 2 * 2 * (SINK + WINDOW) * 16 * 4  # layers, K/V, B, heads
    assert report.total("dense") == allocated(full) == kv(kv_memory(full)) == kv_memory(full).total("dense")


def test_plans_and_inputs_the_ring_would_answer_wrongly_are_refused():
    model = tiny_llama().eval()
    ids = torch.randint(1, 100, (2, 12), device=DEVICE)
    for plan, wrong in [
        ("dense", "dense"),  # a dense (retrieval) head needs the whole past
        (decode_plan(f"streaming:sink={SINK},window={WINDOW // 2}"), "window=8"),  # the ring keeps other keys
    ]:
        compiled = sparsecomp.compile(model, plan, inner="eager", cost_model=False)
        with pytest.raises(ValueError, match=f"StreamingKVCache keeps other keys .*{wrong}"):
            generate_with(compiled, ids, ring(model, 50))
    padded = torch.ones_like(ids)
    padded[1, :3] = 0
    compiled = sparsecomp.compile(model, decode_plan(RULE), inner="eager", cost_model=False)
    with pytest.raises(ValueError, match="does not take padded batches"):
        generate_with(compiled, ids, ring(model, 50), mask=padded)
    cache = ring(model, 50)
    k = torch.randn(1, 2, 12, 16, device=DEVICE)
    cache.update(k, k, 0)
    with pytest.raises(RuntimeError, match="takes its prompt in one update"):
        cache.update(k, k, 0)
    cache.reset()
    cache.update(k, k, 0)  # a new prompt after reset
    with pytest.raises(ValueError, match="window >= 1"):
        sparsecomp.StreamingKVCache(config=model.config, max_cache_len=50, sink=4, window=0)
