"""The pattern registry: a kind registered from outside the package is known to plans, compile and the report."""

import pytest
import torch
from tiny_models import tiny_llama

import sparsecomp
from sparsecomp.demo import streaming_sdpa
from sparsecomp.patterns import PATTERNS, POSITIVE, Pattern, register, unregister
from sparsecomp.plan import Plan, Rule

pytest.importorskip("transformers")


@pytest.fixture
def local_band():
    """A test-only pattern: the last ``width`` keys of each query (a window with no sink)."""
    pattern = register(
        Pattern(
            "local_band",
            params={"width": 0},
            accepts={"width": POSITIVE},
            doc="the last `width` keys of each query",
            local_rule=lambda rule, n_keys: (0, rule.width),
        )
    )
    yield pattern
    unregister("local_band")


def test_a_registered_pattern_compiles_in_a_model_and_matches_its_reference(local_band):
    model = tiny_llama().eval()
    ids = torch.randint(0, 100, (1, 40))
    compiled = sparsecomp.compile(
        model, "local_band:width=8", inner="eager", kernel_options={"block_m": 16, "block_n": 16}
    )
    with torch.no_grad():
        out = compiled(ids).logits
        with streaming_sdpa(sink=0, window=8):
            ref = model(ids).logits
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    report = sparsecomp.inspect(compiled)
    assert all(s.became == "sparse_attention" for s in report.sites), str(report)
    assert "local_band(width=8) x4" in str(report)


def test_a_registered_pattern_is_a_plan_rule(local_band):
    rule = Rule.parse("local_band:width=8")
    assert rule.head_params(100) == (0, 8) and not rule.adaptive
    plan = Plan(sites={"model.layers.0.self_attn": rule})
    assert Plan.from_json(plan.to_json()).sites == plan.sites
    with pytest.raises(ValueError, match="local_band width must be an integer >= 1"):
        Rule("local_band", width=0)


def test_registry_refuses_a_kind_twice_and_mismatched_parameters():
    with pytest.raises(ValueError, match="registered already"):
        register(PATTERNS["streaming"])
    with pytest.raises(ValueError, match="params"):
        register(Pattern("odd", params={"a": 1}, accepts={"b": POSITIVE}, doc="-"))
    assert "odd" not in PATTERNS
    with pytest.raises(ValueError, match="unknown rule kind 'local_band'"):
        Rule.parse("local_band:width=8")  # not registered outside the fixture
