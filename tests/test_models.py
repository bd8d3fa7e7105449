"""Tiny random-weight HF models: every attention matched and rewritten (or kept with a reason)."""

import pytest
import torch
from torch.fx.passes.shape_prop import ShapeProp

import sparsecomp
from sparsecomp.compiler.backend import BackendOptions, SparsecompBackend
from sparsecomp.demo import streaming_sdpa

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM  # noqa: E402

N = 37  # odd, and no other dimension of these models is 37: an (N, N) tensor is a mask
BLOCK = {"block_m": 16, "block_n": 16}
DECODER = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=100,
    head_dim=16,
)


def make(name, impl):
    if name in ("llama", "qwen2", "qwen3"):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(name, **DECODER), attn_implementation=impl)
    if name == "mistral":
        return AutoModelForCausalLM.from_config(
            AutoConfig.for_model(name, sliding_window=8, **DECODER), attn_implementation=impl
        )
    if name == "gemma2":
        return AutoModelForCausalLM.from_config(
            AutoConfig.for_model(name, sliding_window=8, **DECODER), attn_implementation=impl
        )
    if name == "gpt2":
        cfg = AutoConfig.for_model("gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=64)
        return AutoModelForCausalLM.from_config(cfg, attn_implementation=impl)
    if name == "bert":
        cfg = AutoConfig.for_model(
            "bert",
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            vocab_size=100,
        )
        return AutoModel.from_config(cfg, attn_implementation=impl)
    raise ValueError(name)


class ShapeRecordingBackend(SparsecompBackend):
    """Also runs the rewritten graph once on the real inputs to record every tensor's shape."""

    def __call__(self, gm, example_inputs):
        compiled = super().__call__(gm, example_inputs)
        gm = self.graphs[-1].graph_module  # the rewritten graph (the backend rewrites a copy of Dynamo's)
        ShapeProp(gm).propagate(*example_inputs)
        self.shapes = [
            tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes if hasattr(n.meta.get("tensor_meta"), "shape")
        ]
        return compiled


def compile_with(model, plan, backend_cls=SparsecompBackend, inner="eager", **kw):
    backend = backend_cls(BackendOptions.from_any({"plan": plan, "kernel_options": BLOCK, "inner": inner}))
    compiled = torch.compile(model, backend=backend, **kw)
    compiled._sparsecomp_backend = backend
    return compiled, backend


def inputs(batch=2, pad=5, n=N):
    ids = torch.randint(0, 100, (batch, n))
    mask = torch.ones(batch, n, dtype=torch.long)
    mask[-1, :pad] = 0  # left padding
    return ids, mask


def _out(o):
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


MODELS = [
    ("llama", "sdpa", 2),
    ("mistral", "sdpa", 2),
    ("qwen2", "sdpa", 2),
    ("qwen3", "sdpa", 2),
    ("gemma2", "eager", 2),
    ("gpt2", "sdpa", 2),
    ("gpt2", "eager", 2),
    ("bert", "sdpa", 2),
    ("bert", "eager", 2),
    ("llama", "eager", 2),
]


@pytest.mark.parametrize("name,impl,n_sites", MODELS)
def test_dense_plan_matches_eager_with_padding(name, impl, n_sites):
    model = make(name, impl).eval()
    ids, mask = inputs()
    compiled, backend = compile_with(model, "dense", ShapeRecordingBackend)
    with torch.no_grad():
        ref, out = _out(model(ids, attention_mask=mask)), _out(compiled(ids, attention_mask=mask))
    report = sparsecomp.inspect(compiled)
    assert len(report.sites) == n_sites, str(report)
    # Every head dense: the kernel runs the proven structure, and it is not counted as a sparse rewrite.
    assert sparsecomp.counters["dense_kernel"] == n_sites and sparsecomp.counters["rewritten"] == 0, str(report)
    assert all(s.became == "dense_attention" for s in report.sites)
    valid = mask.bool()  # padded query rows hold no meaning (HF and we differ there by design)
    torch.testing.assert_close(out[valid], ref[valid], atol=2e-5, rtol=2e-5)
    # GQA folded: no 5-D repeated K/V; the mask structure made: no (N, N) tensor anywhere.
    assert not any(len(s) == 5 for s in backend.shapes)
    assert not any(len(s) >= 2 and s[-2:] == (N, N) for s in backend.shapes), report.code()
    if name in ("llama", "mistral", "qwen2", "qwen3", "gemma2"):
        assert sparsecomp.counters["gqa_folded"] == n_sites
    assert "sparse_attention_call(" in report.code()


def test_site_names_and_report():
    model = make("llama", "sdpa").eval()
    compiled, _ = compile_with(model, "streaming:sink=2,window=8")
    with torch.no_grad():
        compiled(*inputs(batch=1, pad=0)[:1])
    report = sparsecomp.inspect(compiled)
    assert [s.name for s in report.sites] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    text = str(report)
    assert "streaming(sink=2, window=8) x4" in text and "2 attention sites: 2 sparse_attention" in text
    assert 0 < report.sites[0].density < 1
    g = report.to_networkx()
    assert sum("site" in d for _, d in g.nodes(data=True)) == 2


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_streaming_plan_matches_masked_reference(name):
    model = make(name, "sdpa").eval()
    ids, mask = inputs(batch=2, pad=4)
    compiled, _ = compile_with(model, "streaming:sink=2,window=6")
    with torch.no_grad(), streaming_sdpa(sink=2 + 0, window=6):
        ref = _out(model(ids[:1]))  # no padding row: the reference's sinks count from key 0
    with torch.no_grad():
        out = _out(compiled(ids[:1]))
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_per_head_rules_from_plan():
    model = make("llama", "sdpa").eval()
    s = sparsecomp.Rule("streaming", 1, 4)
    plan = sparsecomp.Plan(sites={"model.layers.1.self_attn": [s, sparsecomp.Rule()]})  # per KV group
    compiled, _ = compile_with(model, plan)
    with torch.no_grad():
        compiled(inputs(1, 0)[0])
    rows = sparsecomp.inspect(compiled).sites
    assert rows[0].rules == ["dense"] * 4
    assert rows[1].rules == [str(s)] * 2 + ["dense"] * 2


def test_dynamic_lengths_do_not_recompile_per_length():
    model = make("llama", "sdpa").eval()
    compiled, backend = compile_with(model, "streaming:sink=2,window=8")
    with torch.no_grad():
        for n in (20, 29, 41, 53, 64):
            ids = torch.randint(0, 100, (1, n))
            with streaming_sdpa(sink=2, window=8):
                ref = _out(model(ids))
            torch.testing.assert_close(_out(compiled(ids)), ref, atol=2e-5, rtol=2e-5)
    assert len(backend.graphs) == 2  # static first graph, then one dynamic graph for every length
    assert all(s.became == "sparse_attention" for s in backend.graphs[-1].sites)


def test_encoder_decoder_float_bias_masks_fall_back_with_reason():
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, vocab_size=100)
    model = T5ForConditionalGeneration(cfg).eval()
    ids, mask = inputs()
    compiled, _ = compile_with(model, "dense")
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, decoder_input_ids=ids).logits
        out = compiled(input_ids=ids, attention_mask=mask, decoder_input_ids=ids).logits
    torch.testing.assert_close(out, ref)
    report = sparsecomp.inspect(compiled)
    assert len(report.sites) == 6  # 2 encoder self, 2 decoder self, 2 cross
    kept = [s for s in report.sites if s.became == "kept"]
    assert kept and all("additive float mask" in s.reason for s in kept)


class Attn(torch.nn.Module):
    def __init__(self, head_dim=16, dropout=0.0, bias=False):
        super().__init__()
        self.head_dim, self.dropout, self.bias = head_dim, dropout, bias

    def forward(self, x):
        b, n, _ = x.shape
        q = k = v = x.view(b, n, -1, self.head_dim).transpose(1, 2)
        mask = None
        if self.bias:  # ALiBi-like float bias: not a keep/remove mask
            mask = -torch.arange(n, dtype=x.dtype).view(1, 1, 1, n).expand(1, 1, n, n) * 0.1
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout, is_causal=not self.bias
        )


@pytest.mark.parametrize(
    "module,reason",
    [
        (Attn(head_dim=12), "head_dim=12"),
        (Attn(bias=True), "additive float mask"),
        (Attn(dropout=0.1).train(), "dropout_p=0.1"),
    ],
)
def test_unsupported_sites_are_kept_exactly_with_a_reason(module, reason):
    x = torch.randn(2, 24, 48)
    compiled, _ = compile_with(module, "streaming:sink=1,window=4")
    if module.dropout:
        torch.manual_seed(1)
        out = compiled(x)
        torch.manual_seed(1)
        ref = module(x)
    else:
        out, ref = compiled(x), module(x)
    torch.testing.assert_close(out, ref)
    site = sparsecomp.inspect(compiled).sites[0]
    assert site.became == "kept" and reason in site.reason
    assert sparsecomp.counters["kept"] == 1 and sparsecomp.counters["rewritten"] == 0


def test_registered_backend_and_inductor():
    module = Attn().eval()
    x = torch.randn(1, 40, 64)
    compiled = torch.compile(
        module, backend="sparsecomp", options={"plan": "streaming:sink=2,window=8", "kernel_options": BLOCK}
    )
    out = compiled(x)
    q = x.view(1, 40, 4, 16).transpose(1, 2)
    with streaming_sdpa(sink=2, window=8):
        ref = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert sparsecomp.inspect().sites[0].became == "sparse_attention"


def test_plan_for_another_model_is_refused():
    model = make("llama", "sdpa")
    plan = sparsecomp.Plan(fingerprint={"architecture": "LlamaForCausalLM", "num_layers": 30})
    with pytest.raises(ValueError, match="another model"):
        sparsecomp.compile(model, plan)


class TwoAttentionsWithAGraphBreak(torch.nn.Module):
    """Seen on torch 2.11 with T5: graph breaks split a model into several graphs."""

    def __init__(self):
        super().__init__()
        self.first, self.second = Attn(), Attn()

    def forward(self, x):
        y = self.first(x).transpose(1, 2).reshape(x.shape)
        torch._dynamo.graph_break()
        return self.second(y)


def test_report_shows_the_sites_of_every_graph():
    x = torch.randn(2, 24, 48)
    compiled, _ = compile_with(TwoAttentionsWithAGraphBreak(), "streaming:sink=1,window=4")
    with torch.no_grad():
        compiled(x)
        compiled(torch.randn(2, 24, 48))  # no recompile: the sites are not listed twice
    report = sparsecomp.inspect(compiled)
    assert len(report.graphs) == 2
    assert [s.name for s in report.sites] == ["first", "second"]
    assert all(s.became == "sparse_attention" for s in report.sites)
