import json

import pytest

from sparsecomp import Plan, Rule, model_fingerprint


def test_presets_parse():
    assert Plan.from_any("dense").default == Rule("dense")
    plan = Plan.from_any("streaming:sink=64,window=1024")
    assert plan.default == Rule("streaming", sink=64, window=1024)
    assert plan.rules_for("model.layers.0.self_attn", 4, 2) == [Rule("streaming", 64, 1024)] * 4


@pytest.mark.parametrize("text", ["sliding:window=3", "streaming:sink=4", "streaming:sink=1,window=2,foo=3"])
def test_bad_presets_fail_loudly(text):
    with pytest.raises(ValueError):
        Plan.from_any(text)


def test_json_round_trip_with_per_head_and_per_group_rules(tmp_path):
    s = Rule("streaming", 4, 16)
    plan = Plan(
        default=Rule("dense"),
        sites={"a": [s, Rule(), s, Rule()], "b": [Rule(), s]},
        fingerprint={"architecture": "X", "head_dim": 16},
        info={"made_by": "test"},
    )
    path = tmp_path / "plan.json"
    plan.save(path)
    again = Plan.load(path)
    assert again.to_json() == plan.to_json()
    assert json.loads(path.read_text())["version"] == 1
    assert again.rules_for("a", 4, 2) == [s, Rule(), s, Rule()]
    assert again.rules_for("b", 4, 2) == [Rule(), Rule(), s, s]  # per KV group, expanded
    assert again.rules_for("unnamed", 4, 2) == [Rule()] * 4
    with pytest.raises(ValueError, match="3 rules"):
        Plan(sites={"c": [s] * 3}).rules_for("c", 4, 2)


def test_schema_version_checked():
    with pytest.raises(ValueError, match="schema version"):
        Plan.from_json({"version": 99})


def test_fingerprint_mismatch_refused():
    plan = Plan(fingerprint={"architecture": "LlamaForCausalLM", "num_layers": 2, "head_dim": 16})
    plan.check_fingerprint({"architecture": "LlamaForCausalLM", "num_layers": 2, "head_dim": 16})
    with pytest.raises(ValueError, match="num_layers: plan 2 vs model 3"):
        plan.check_fingerprint({"architecture": "LlamaForCausalLM", "num_layers": 3, "head_dim": 16})


def test_model_fingerprint_from_hf_config(tiny_llama):
    fp = model_fingerprint(tiny_llama)
    assert fp == {
        "architecture": "LlamaForCausalLM",
        "num_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
    }


@pytest.fixture
def tiny_llama():
    from tiny_models import tiny_llama

    return tiny_llama()


@pytest.mark.parametrize("n,sink,window", [(1, 0, 4), (10, 2, 4), (37, 3, 8), (100, 10, 100), (64, 0, 1)])
def test_streaming_density_counts_kept_pairs(n, sink, window):
    import torch

    from sparsecomp.report import streaming_density

    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    keep = (j <= i) & ((i - j < window) | (j < sink))
    assert streaming_density(n, sink, window) == pytest.approx(keep.sum().item() / (n * (n + 1) / 2))


def test_elastic_rule_window_grows_with_the_length():
    rule = Rule.parse("elastic:sink=4,a=10,b=0.125")
    assert rule.head_params(100) == (4, 23) and rule.head_params(1000) == (4, 135)
    assert Rule.parse(rule.spec()) == rule
    with pytest.raises(ValueError, match="depends on the number of keys"):
        rule.head_params()
    with pytest.raises(ValueError, match="elastic needs"):
        Rule("elastic", sink=4, a=0, b=0.0)
