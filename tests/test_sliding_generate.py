"""Generation with sliding-window models (Mistral, Gemma 2): their static cache keeps a rolling
window, so cache slots are not positions. Compiled with the dense plan, and with a decode selection
whose budget covers every slot, tokens and logits must be eager's after the window has wrapped."""

import pytest
from test_decode_rules import decode_plan
from test_generate import assert_same_generation, generate, prompt
from test_models import make
from tiny_models import DEVICE

import sparsecomp

pytest.importorskip("transformers")


# Gemma 2's eager attention soft-caps its scores: a float bias, kept with a reason
@pytest.mark.parametrize(
    "name, impl, sparse_became", [("mistral", "sdpa", "sparse_decode"), ("gemma2", "eager", "kept")]
)
@pytest.mark.parametrize("rule", ["dense", "double_sparsity:channels=4,k=64"])
def test_sliding_window_generation_equals_eager(name, impl, sparse_became, rule):
    model = make(name, impl).to(DEVICE).eval()
    from transformers import StaticCache

    layers = StaticCache(config=model.config, max_cache_len=26).layers
    assert any(type(layer).__name__ == "StaticSlidingWindowLayer" for layer in layers)  # a ring of 8 slots
    ids, mask = prompt(2, n=20)  # longer than the window: the static cache's ring has wrapped
    ref = generate(model, ids, mask, "static", scores=True)
    plan = "dense" if rule == "dense" else decode_plan(rule)
    compiled = sparsecomp.compile(model, plan, inner="eager", cost_model=False)
    out = generate(compiled, ids, mask, "static", scores=True)
    assert_same_generation(out, ref)
    decode = [s for g in sparsecomp.inspect(compiled).graphs if g.phase() == "decode" for s in g.sites]
    assert decode and all(s.became == ("kept" if rule == "dense" else sparse_became) and s.reason for s in decode)
