"""One plan, both phases: prefill and decode steps get their own rules."""

import json

import pytest
import torch
from test_generate import assert_same_generation, generate, prompt
from tiny_models import tiny_llama

import sparsecomp
from sparsecomp.plan import Plan, Rule

pytest.importorskip("transformers")

BLOCK = {"block_m": 16, "block_n": 16}


def test_phase_presets_parse_and_round_trip():
    plan = Plan.from_any("prefill=dense;decode=streaming:sink=4,window=64")
    assert plan.default == Rule() and plan.decode_default == Rule("streaming", sink=4, window=64)
    assert plan.rules_for("any", 2, 1, "decode") == [Rule("streaming", sink=4, window=64)] * 2
    assert plan.rules_for("any", 2, 1) == [Rule()] * 2
    saved = plan.to_json()
    assert saved["version"] == 2 and Plan.from_json(json.loads(json.dumps(saved))).decode_default == plan.decode_default
    assert Plan.from_any("streaming:sink=4,window=64").to_json()["version"] == 1  # no decode rules: still version 1
    decode_only = Plan.from_any("decode=streaming:sink=0,window=8")
    assert decode_only.default == Rule() and decode_only.rules_for("x", 1, 1, "decode")[0].kind == "streaming"


@pytest.mark.parametrize(
    "text,message",
    [
        ("prefill=dense;prefill=dense", "gives prefill twice"),
        ("decode=streamng:window=4", "unknown rule kind 'streamng'"),
        ("warmup=dense", "'warmup' is not a phase"),
        ("decode=streaming:window=0", "streaming window must be an integer >= 1"),
    ],
)
def test_bad_phase_presets_say_what_is_wrong(text, message):
    with pytest.raises(ValueError, match=message):
        Plan.from_any(text)


def test_decode_sites_by_name_and_their_fallback_to_prefill_rules():
    streaming = Rule("streaming", sink=2, window=8)
    plan = Plan(default=streaming, decode_sites={"model.layers.1.self_attn": Rule()})
    assert plan.rules_for("model.layers.1.self_attn", 2, 2, "decode") == [Rule()] * 2
    assert plan.rules_for("model.layers.0.self_attn", 2, 2, "decode") == [streaming] * 2  # prefill's rule


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_dense_prefill_with_a_streaming_decode(cache):
    """Prefill keeps SDPA's causal kernel, every decode step runs the sparse kernel; with a window
    past the whole generation that is eager's generation."""
    model = tiny_llama().eval()
    ids, mask = prompt(1 if cache == "static" else 2)
    ref = generate(model, ids, mask, cache, scores=True)
    compiled = sparsecomp.compile(model, "prefill=dense;decode=streaming:sink=0,window=64", inner="eager",
                                  kernel_options=BLOCK)  # fmt: skip
    assert_same_generation(generate(compiled, ids, mask, cache, scores=True), ref)
    report = sparsecomp.inspect(compiled)
    prefill = [s for g in report.graphs if g.phase() == "prefill" for s in g.sites]
    decode = [s for g in report.graphs if g.phase() == "decode" for s in g.sites]
    assert prefill and all(s.became in ("sdpa_causal", "dense_attention") for s in prefill), str(report)
    assert decode and all(s.became == "sparse_attention" for s in decode), str(report)
    assert all("streaming(sink=0, window=64)" in s.rules_summary() for s in decode)


def test_a_plan_naming_an_absent_decode_site_is_an_error():
    model = tiny_llama().eval()
    plan = Plan(decode_sites={"model.layers.9.self_attn": Rule("streaming", window=8)})
    compiled = sparsecomp.compile(model, plan, inner="eager")
    with pytest.raises(Exception, match=r"model\.layers\.9\.self_attn"), torch.no_grad():
        compiled(torch.randint(0, 100, (1, 12)))


@pytest.mark.parametrize(
    "rule", ["vertical_slash:n_vertical=8,n_slash=8,last_q=4", "sample:alpha=0.9", "block_topk:k=2"]
)
def test_adaptive_prefill_rules_leave_decode_steps_dense(rule):
    model = tiny_llama().eval()
    ids, mask = prompt(2, n=40)
    compiled = sparsecomp.compile(model, rule, inner="eager", kernel_options=BLOCK)
    generate(compiled, ids, mask, "dynamic")
    report = sparsecomp.inspect(compiled)
    decode = [s for g in report.graphs if g.phase() == "decode" for s in g.sites]
    prefill = [s for g in report.graphs if g.phase() == "prefill" for s in g.sites]
    assert prefill and all(s.became == "sparse_attention" for s in prefill), str(report)
    assert decode and all(s.became == "kept" and "decode step" in s.reason for s in decode), str(report)
    assert all("adaptive rules are prefill patterns" in s.mask for s in decode), str(report)
