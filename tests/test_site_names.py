"""Site names are spelled as named_modules() spells them, and plans that name no real site fail loudly."""

import pytest
import torch
from test_models import MODELS, inputs, make

import sparsecomp
from sparsecomp import Plan, Rule

pytest.importorskip("transformers")

STREAMING = Rule("streaming", sink=2, window=8)


def run(model, plan, **kw):
    compiled = sparsecomp.compile(model, plan, inner="eager", kernel_options={"block_m": 16, "block_n": 16}, **kw)
    with torch.no_grad():
        compiled(*inputs(batch=1, pad=0)[:1])
    return sparsecomp.inspect(compiled)


@pytest.mark.parametrize("name,impl", sorted({(n, i) for n, i, _ in MODELS}))
def test_site_names_are_module_paths(name, impl):
    model = make(name, impl).eval()
    report = run(model, "dense")
    modules = dict(model.named_modules())
    assert report.sites and all(s.name in modules for s in report.sites), [s.name for s in report.sites]


@pytest.mark.parametrize("spelling", ["model.layers.0.self_attn", "L.args.0.model.layers.0.self_attn"])
def test_a_plan_keyed_by_module_path_is_applied(spelling):
    """Either spelling (the second is what older releases wrote under transformers >= 5.2x) loads."""
    model = make("llama", "sdpa").eval()
    plan = Plan.from_json({"version": 1, "default": "dense", "sites": {spelling: STREAMING.spec()}})
    report = run(model, plan)
    assert report.site("model.layers.0.self_attn").became == "sparse_attention", str(report)
    assert report.site("model.layers.1.self_attn").became != "sparse_attention", str(report)
    assert sparsecomp.counters["rewritten"] == 1


def test_a_plan_naming_absent_sites_is_an_error():
    model = make("llama", "sdpa").eval()
    plan = Plan(sites={"model.layers.7.self_attn": STREAMING, "model.layers.0.self_attn": STREAMING})
    with pytest.raises(Exception, match=r"model\.layers\.7\.self_attn.*model\.layers\.0\.self_attn"):
        run(model, plan)


def test_strict_false_makes_it_a_warning_in_the_report():
    model = make("llama", "sdpa").eval()
    plan = Plan(sites={"decoder.block.0.attn": STREAMING})
    report = run(model, plan, strict=False)
    assert "warning: the plan names 1 site(s)" in str(report) and "decoder.block.0.attn" in str(report)
    assert sparsecomp.counters["plan_sites_unmatched"] == 1 and sparsecomp.counters["rewritten"] == 0


def test_compiling_a_bound_forward_names_sites_too():
    """``model.forward = sparsecomp.compile(model.forward, plan)``: the pattern Hugging Face documents."""
    model = make("llama", "sdpa").eval()
    plan = Plan(sites={"model.layers.1.self_attn": STREAMING})
    forward = sparsecomp.compile(model.forward, plan, inner="eager", kernel_options={"block_m": 16, "block_n": 16})
    with torch.no_grad():
        forward(inputs(batch=1, pad=0)[0])
    assert sparsecomp.inspect(forward).site("model.layers.1.self_attn").became == "sparse_attention"
