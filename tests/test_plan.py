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

    from sparsecomp.patterns.local import local_rule_density

    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    keep = (j <= i) & ((i - j < window) | (j < sink))
    assert local_rule_density(n, sink, window) == pytest.approx(keep.sum().item() / (n * (n + 1) / 2))


def test_elastic_rule_window_grows_with_the_length():
    rule = Rule.parse("elastic:sink=4,a=10,b=0.125")
    assert rule.head_params(100) == (4, 23) and rule.head_params(1000) == (4, 135)
    assert Rule.parse(rule.spec()) == rule
    with pytest.raises(ValueError, match="depends on the number of keys"):
        rule.head_params()
    with pytest.raises(ValueError, match="elastic needs"):
        Rule("elastic", sink=4, a=0, b=0.0)


# Exact parameter types: nothing is coerced (8.7 is not 8, True is not 1, NaN never reaches a kernel).
@pytest.mark.parametrize(
    "kind,params,message",
    [
        ("streaming", {"sink": 4, "window": 8.7}, "streaming window must be an integer >= 1; got 8.7"),
        ("streaming", {"sink": 4, "window": True}, "streaming window must be an integer >= 1; got True"),
        ("streaming", {"sink": -1, "window": 8}, "streaming sink must be an integer >= 0; got -1"),
        ("streaming", {"sink": 4, "window": "8"}, "streaming window must be an integer >= 1; got '8'"),
        ("streaming", {"sink": 4, "window": float("inf")}, "streaming window must be an integer >= 1; got inf"),
        ("streaming", {"sink": 4}, "streaming needs window, an integer >= 1"),
        ("elastic", {"sink": 4, "a": 4.5, "b": 0.1}, "elastic a must be an integer; got 4.5"),
        ("elastic", {"sink": 4, "a": 4, "b": float("nan")}, "elastic b must be a finite number >= 0; got nan"),
        ("elastic", {"sink": 4, "a": 4, "b": -0.5}, "elastic b must be a finite number >= 0; got -0.5"),
        ("elastic", {"sink": 4, "a": 0, "b": 0.0}, "elastic needs a window that grows past 0"),
        ("vertical_slash", {"mass": True}, "vertical_slash mass must be a finite number in \\(0, 1\\]; got True"),
        ("vertical_slash", {"last_q": 0}, "vertical_slash last_q must be an integer >= 1; got 0"),
        ("sample", {"alpha": 1.5}, "sample alpha must be a finite number in \\(0, 1\\]; got 1.5"),
        ("sample", {"window_ratio": float("-inf")}, "sample window_ratio must be a finite number in \\[0, 1\\]"),
        ("block_topk", {"pool": "max"}, "block_topk pool must be one of \\('mean', 'minmax'\\); got 'max'"),
        ("block_topk", {"pool": 1}, "block_topk pool must be one of"),
        ("block_topk", {"k": 0}, "block_topk needs k > 0 or coverage > 0"),
        ("dense", {"window": 3}, "unknown parameter\\(s\\) \\['window'\\] for dense"),
    ],
)
def test_rule_parameters_are_exact(kind, params, message):
    with pytest.raises(ValueError, match=message):
        Rule(kind, **params)


def test_rule_parameters_taken_exactly_as_python_types():
    import numpy as np

    rule = Rule("streaming", np.int64(4), 8.0)  # integral values of any number type are exact
    assert rule == Rule("streaming", 4, 8) and type(rule.sink) is int and type(rule.window) is int
    elastic = Rule("elastic", sink=np.int32(1), a=-16, b=np.float32(0.25))  # a < 0 is fine when b grows
    assert type(elastic.b) is float and elastic.b == 0.25 and elastic.head_params(100) == (1, 9)
    assert Rule("vertical_slash", mass=1).mass == 1.0 and type(Rule("vertical_slash", mass=1).mass) is float
    with pytest.raises(ValueError, match="both by position and by name"):
        Rule("streaming", 4, 8, sink=3)
    with pytest.raises(ValueError, match="unknown rule kind 5"):
        Rule(5)


@pytest.mark.parametrize(
    "text,message",
    [
        ("streamng:sink=4", "unknown rule kind 'streamng'; known: \\('dense', 'streaming'"),
        ("sliding:window=3", "unknown rule kind 'sliding'; known: "),
        ("", "unknown rule kind ''"),
        ("streaming:window=abc", "streaming window must be an integer >= 1; got 'abc'"),
        ("streaming:sink=4,window=8.7", "streaming window must be an integer >= 1; got '8.7'"),
        ("streaming:sink=4,window=", "streaming window must be an integer >= 1; got ''"),
        ("streaming:window", "rule 'streaming:window': 'window' is not name=value; streaming takes"),
        ("streaming:=3", "rule 'streaming:=3': '=3' is not name=value"),
        ("streaming:sink=4", "streaming needs window"),
        ("streaming:window=4,window=5", "gives window twice"),
        ("streaming:sink=1,window=2,foo=3", "unknown parameter 'foo' in rule .*; known: \\('sink', 'window'\\)"),
        ("elastic:sink=4,a=4.5,b=0.1", "elastic a must be an integer; got '4.5'"),
        ("elastic:sink=4,a=4,b=nan", "elastic b must be a finite number >= 0; got nan"),
        ("sample:alpha=inf", "sample alpha must be a finite number in"),
        ("block_topk:k=4,pool=max", "block_topk pool must be one of"),
    ],
)
def test_rule_parse_errors_name_the_bad_part(text, message):
    with pytest.raises(ValueError, match=message):
        Rule.parse(text)


@pytest.mark.parametrize(
    "rule",
    [
        Rule(),
        Rule("streaming", 0, 1),
        Rule("elastic", sink=64, a=-1024, b=0.375),
        Rule("vertical_slash", n_vertical=5, mass=0.9),
        Rule("sample", alpha=0.8, window_ratio=0.0),
        Rule("block_topk", k=0, coverage=0.5, pool="minmax"),
    ],
)
def test_every_kind_round_trips_through_its_spec(rule):
    assert Rule.parse(rule.spec()) == rule
    assert Rule(**rule.to_json()) == rule


def test_every_parameter_says_what_it_accepts():
    from sparsecomp.plan import RULE_ACCEPTS, RULE_PARAMS

    assert {k: set(v) for k, v in RULE_ACCEPTS.items()} == {k: set(v) for k, v in RULE_PARAMS.items()}


# Plan files: whatever is wrong, one ValueError naming the file and the problem.
@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "is empty"),
        (b"  \n", "is empty"),
        (b'{"version": 1, "sites": {"a": "stream', "is not valid JSON \\(truncated\\?\\): .* line 1 column"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "is not UTF-8 text"),
        (b"version: 1\n", "is not valid JSON"),
        (b"[1, 2]", "a plan is a JSON object with .*; got a list"),
        (b'"dense"', "a plan is a JSON object .*; got a string"),
        (b'{"version": 3}', r"plan schema version 3; this sparsecomp reads versions \(1, 2\)"),
        (b'{"version": true}', "plan schema version True"),
        (b'{"sites": {}}', "plan schema version None"),
        (b'{"version": 1, "site": {}}', "unknown plan field\\(s\\) \\['site'\\]"),
        (b'{"version": 1, "sites": []}', "plan 'sites' must be an object \\{site name: rule or list of rules\\}"),
        (b'{"version": 1, "fingerprint": [1]}', "plan 'fingerprint' must be an object; got a list"),
        (b'{"version": 1, "info": "x"}', "plan 'info' must be an object; got a string"),
        (b'{"version": 1, "sites": {"a": 5}}', "plan site 'a': a rule is a spec string .*; got a number \\(5\\)"),
        (b'{"version": 1, "sites": {"a": [null]}}', "plan site 'a' rule 0: a rule is .*; got null"),
        (b'{"version": 1, "sites": {"a": []}}', "plan site 'a': an empty list of rules"),
        (b'{"version": 1, "sites": {"a": {"window": 3}}}', "plan site 'a': a rule object needs 'kind'"),
        (b'{"version": 1, "sites": {"a": {"kind": "streaming", "window": 8.7}}}', "streaming window must be"),
        (b'{"version": 1, "sites": {"a": ["dense", "streamng:sink=4"]}}', "site 'a' rule 1: unknown rule kind"),
        (b'{"version": 1, "default": "elastic:a=4,b=NaN"}', "plan default: elastic b must be a finite number"),
        (b'{"version": 1, "default": {"kind": "elastic", "a": 4, "b": NaN}}', "elastic b must be a finite number"),
    ],
)
def test_bad_plan_files_name_the_file_and_the_problem(tmp_path, content, message):
    path = tmp_path / "plan.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as info:
        Plan.load(path)
    assert str(info.value).startswith(f"plan file {path}")
    with pytest.raises(ValueError, match=message):
        Plan.from_any(str(path))


def test_missing_plan_file_and_folders(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="plan file not found") as info:
        Plan.load(missing)
    assert info.value.filename == str(missing) and str(missing) in str(info.value)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        Plan.from_any(str(missing))
    with pytest.raises(ValueError, match="is a directory"):
        Plan.load(tmp_path)


def test_from_json_errors_without_a_file():
    with pytest.raises(ValueError, match="got a list"):
        Plan.from_json([])
    with pytest.raises(ValueError, match="plan 'sites' must be an object"):
        Plan.from_json({"version": 1, "sites": ["a"]})


def test_rule_objects_of_the_first_plan_format_still_load():
    plan = Plan.from_json({"version": 1, "default": {"kind": "streaming", "sink": 4, "window": 16}})
    assert plan.default == Rule("streaming", 4, 16)


@pytest.mark.parametrize(
    "plan,error,message",
    [
        (
            "my_plan",
            ValueError,
            "plan 'my_plan' is neither a .json plan file nor a preset .*unknown rule kind 'my_plan'",
        ),
        ("plans/a.jsn", ValueError, "neither a .json plan file nor a preset"),
        ("streamng:sink=4", ValueError, "unknown rule kind 'streamng'; known: "),
        ("streaming:window=abc", ValueError, "plan preset 'streaming:window=abc': streaming window must be an integer"),
        ("missing.json", FileNotFoundError, "missing.json"),
        (5, TypeError, "got int"),
    ],
)
def test_from_any_says_what_a_plan_can_be(plan, error, message):
    with pytest.raises(error, match=message):
        Plan.from_any(plan)


def test_stored_plans_still_load():
    from pathlib import Path

    paths = sorted((Path(__file__).parents[1] / "benchmarks" / "results").glob("*plan*.json"))
    for path in paths:
        plan = Plan.load(path)
        assert Plan.from_json(plan.to_json()).to_json() == plan.to_json()


# Site names: the named_modules() spelling, whatever root prefix older Dynamo naming left on them.
@pytest.mark.parametrize(
    "name,canonical",
    [
        ("L.args.0.model.layers.0.self_attn", "model.layers.0.self_attn"),
        ("L.args.12.model.layers.0.self_attn", "model.layers.0.self_attn"),
        ("L.self.model.layers.3.self_attn", "model.layers.3.self_attn"),
        ("L.fn.layers.1.attn", "layers.1.attn"),
        ("L.mod.h.0.attn", "h.0.attn"),
        ("L.model.model.layers.0.self_attn", "model.layers.0.self_attn"),
        ("L.module.encoder.layer.0", "encoder.layer.0"),
        ("L.kwargs.model.layers.0.self_attn", "layers.0.self_attn"),
        ("L.self.0.attn", "0.attn"),  # a Sequential root: the index is the module's name
        ("L.args.0", ""),  # the root module itself
        ("model.layers.0.self_attn", "model.layers.0.self_attn"),
        ("L.other.layers.0", "L.other.layers.0"),  # not a root local: left alone
        ("L.args.x.layers.0", "L.args.x.layers.0"),
        ("L.selfish.layers.0", "L.selfish.layers.0"),
        ("Lx.self.layers.0", "Lx.self.layers.0"),
        ("attention", "attention"),
    ],
)
def test_canonical_site_name(name, canonical):
    from sparsecomp.plan import canonical_site_name

    assert canonical_site_name(name) == canonical
    assert canonical_site_name(canonical_site_name(name)) == canonical_site_name(name)


def test_plans_written_with_dynamo_roots_load_by_module_name(tmp_path):
    s = Rule("streaming", 4, 16)
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"version": 1, "sites": {"L.args.0.model.layers.0.self_attn": s.spec()}}))
    plan = Plan.load(path)
    assert plan.sites == {"model.layers.0.self_attn": s}
    assert plan.rules_for("model.layers.0.self_attn", 2, 2) == [s, s]
    assert plan.rules_for("L.args.0.model.layers.0.self_attn", 2, 2) == [s, s]
    assert Plan(sites={"L.self.model.layers.1.self_attn": [s]}).sites == {"model.layers.1.self_attn": [s]}
    with pytest.raises(ValueError, match="both name site 'model.layers.0.self_attn'"):
        Plan(sites={"L.args.0.model.layers.0.self_attn": s, "model.layers.0.self_attn": Rule()})
    measured = {"L.args.0.model.layers.0.self_attn": {"heads": [{"density": 0.5}]}}
    plan = Plan(sites={"L.args.0.model.layers.0.self_attn": s}, info={"measured": measured, "made_by": "x"})
    assert plan.info == {"measured": {"model.layers.0.self_attn": {"heads": [{"density": 0.5}]}}, "made_by": "x"}
    path.write_text(json.dumps({"version": 1, "sites": {"L.self.a": "dense", "a": "dense"}}))
    with pytest.raises(ValueError, match=f"plan file {path}: plan sites 'L.self.a' and 'a' both name site 'a'"):
        Plan.load(path)


def test_plan_constructor_checks_types():
    with pytest.raises(TypeError, match="plan default must be a Rule"):
        Plan(default="dense")
    with pytest.raises(TypeError, match="non-empty list of Rules"):
        Plan(sites={"a": []})
    with pytest.raises(TypeError, match="non-empty list of Rules"):
        Plan(sites={"a": ["dense"]})
    assert Plan(sites={"a": (Rule(), Rule())}).sites == {"a": [Rule(), Rule()]}


def test_decisions_read_typed_fields_and_old_plans_fill_them_from_info():
    """block and densities are typed Plan fields (saved at the top level); plans saved before kept
    them in calibration's info, and load with them filled in."""
    old = {
        "version": 1,
        "default": "dense",
        "sites": {"model.layers.0.self_attn": "streaming:sink=4,window=64"},
        "info": {
            "block": 64,
            "measured": {"model.layers.0.self_attn": {"heads": [{"density": 0.25}, {"density": 0.5}]}},
        },
    }
    plan = Plan.from_json(old)
    assert plan.block == 64 and plan.densities == {"model.layers.0.self_attn": [0.25, 0.5]}
    again = Plan.from_json(json.loads(json.dumps(plan.to_json())))
    assert again.block == 64 and again.densities == plan.densities
    typed = Plan(block=32, densities={"a": [0.1]}, info={"block": 64})  # the typed field wins over info
    assert typed.block == 32
    for bad in ({"block": 0}, {"block": 64.0}, {"densities": {"a": [1.5]}}, {"densities": {"a": 0.5}}):
        with pytest.raises(ValueError):
            Plan(**bad)
