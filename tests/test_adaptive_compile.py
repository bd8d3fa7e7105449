"""Plans with adaptive rules compile into index builders in the graph, head by head: the compiled
model equals the model whose attention uses each head's dense reference mask."""

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from attention_cases import golden
from test_adaptive_index import (
    SCALE,
    block_topk_reference,
    sample_reference,
    vertical_slash_reference,
)
from test_models import compile_with
from tiny_models import tiny_llama

import sparsecomp
from sparsecomp import Plan, Rule
from sparsecomp.kernels import index_positions
from sparsecomp.kernels.prefill.block_sparse_attention import structure_pairs

LAYER_RULES = [
    [  # one rule kind per head
        Rule("vertical_slash", n_vertical=5, n_slash=6, last_q=16, sink=2, local=3),
        Rule("sample", alpha=0.8, window_ratio=0.1, sample_ratio=0.2),
        Rule("block_topk", k=2),
        Rule("streaming", sink=2, window=20),
    ],
    [  # one vertical-slash group with per-head budgets, a dense head, block top-k
        Rule("vertical_slash", n_vertical=9, n_slash=2, last_q=16, sink=2, local=3),
        Rule("vertical_slash", n_vertical=3, n_slash=7, last_q=16, sink=2, local=3),
        Rule("dense"),
        Rule("block_topk", k=1),
    ],
]


def head_masks(q, k, key_ok, rules):
    """(B, Hq, N, N) keep mask: each head's rule by the tests' dense references."""
    n = q.shape[2]
    if k.shape[1] == q.shape[1]:  # the model repeated K for GQA: back to one head per KV group
        k = k[:, :: q.shape[1] // 2]
    pos = index_positions(q, 2)
    causal = structure_pairs(pos, pos, key_ok, causal=True, window=0).expand(q.shape[0], 1, n, n)
    masks = []
    for h, r in enumerate(rules):
        if r.kind == "vertical_slash":
            nv = [r.n_vertical] * 4
            ns = [r.n_slash] * 4
            m = vertical_slash_reference(q, k, key_ok, pos, pos, nv, ns, r.last_q, r.sink, r.local)
        elif r.kind == "sample":
            m = sample_reference(q, k, key_ok, pos, pos, [r.alpha] * 4, r.window_ratio, r.sample_ratio)
        elif r.kind == "block_topk":
            m = block_topk_reference(q, k, key_ok, pos, pos, [r.k] * 4)
        elif r.kind == "streaming":
            i, j = pos[0][:, None], pos[0][None, :]
            start = key_ok.long().argmax(-1)[:, None, None, None] if key_ok is not None else 0
            m = causal & ((i - j < r.window) | (j - start < r.sink))
        else:
            m = causal
        masks.append(m.expand(q.shape[0], 4, n, n)[:, h])
    return torch.stack(masks, 1)


@contextmanager
def reference_attention(layer_rules):
    """SDPA replaced by fp64 attention on each head's reference mask, layer after layer."""
    original, calls = F.scaled_dot_product_attention, []

    def attend(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        rules = layer_rules[len(calls) % len(layer_rules)]
        calls.append(1)
        key_ok = attn_mask[:, 0, -1, :] if attn_mask is not None else None
        keep = head_masks(q, k, key_ok, rules)
        kv = k if k.shape[1] != q.shape[1] else k[:, ::2]
        vv = v if v.shape[1] != q.shape[1] else v[:, ::2]
        return golden(q, kv, vv, keep, SCALE).to(q.dtype)

    F.scaled_dot_product_attention = attend
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def test_per_head_adaptive_rules_compile_and_match_the_reference():
    torch.manual_seed(0)
    model = tiny_llama(hidden_size=64).eval()  # head_dim 16: the adaptive tests' SCALE
    plan = Plan(sites={f"model.layers.{i}.self_attn": rules for i, rules in enumerate(LAYER_RULES)})
    ids = torch.randint(0, 100, (2, 100))
    mask = torch.ones(2, 100, dtype=torch.long)
    mask[-1, :6] = 0
    compiled, _ = compile_with(model, plan)
    with torch.no_grad():
        out = compiled(input_ids=ids, attention_mask=mask).logits
        with reference_attention(LAYER_RULES):
            ref = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
    report = sparsecomp.inspect(compiled)
    assert [s.became for s in report.sites] == ["sparse_attention"] * 2
    assert report.sites[0].rules[0].startswith("vertical_slash(") and report.sites[0].density is None
    assert sparsecomp.counters["rewritten"] == 2


def test_adaptive_rules_parse_and_validate():
    r = Rule.parse("vertical_slash:n_vertical=500,last_q=32")
    assert (r.n_vertical, r.n_slash, r.last_q) == (500, 6096, 32)
    assert Rule.parse(str(Rule("block_topk", k=3)).replace("(", ":").replace(")", "").replace(" ", "")) == Rule(
        "block_topk", k=3
    )
    bad_rules = ("sample:alpha=1.5", "block_topk:k=0", "block_topk:pool=max", "vertical_slash:last_q=0")
    for bad in (*bad_rules, "vertical_slash:mass=0"):
        try:
            Rule.parse(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad} was accepted")
    plan = Plan(default=Rule("sample", alpha=0.9), sites={"a": [Rule("block_topk", k=2, pool="minmax"), Rule()]})
    again = Plan.from_json(plan.to_json())
    assert again.default == plan.default and again.sites == plan.sites


def test_adaptive_plan_compiles_once_for_every_length():
    """Through Inductor with dynamic lengths, the builders add no guard on the length itself: the
    first length compiles static, the second one dynamic graph that serves every later length (a
    linspace in SampleAttention's builder once made that a recompile per length)."""
    torch.manual_seed(1)
    model = tiny_llama(hidden_size=64).eval()
    plan = Plan(sites={f"model.layers.{i}.self_attn": rules for i, rules in enumerate(LAYER_RULES)})
    compiled, backend = compile_with(model, plan, inner="inductor")
    with torch.no_grad():
        for n in (100, 130, 170):
            ids = torch.randint(0, 100, (2, n))  # the references' batch
            out = compiled(input_ids=ids).logits
            with reference_attention(LAYER_RULES):
                ref = model(input_ids=ids).logits
            torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
    assert len(backend.graphs) == 2


def test_adaptive_rules_run_at_the_plans_calibration_block_without_a_cost_model():
    """What an adaptive rule keeps depends on the block size: with the cost model off, a plan's
    ``block`` (what it was calibrated at) is used, not the default config's 128."""
    torch.manual_seed(2)
    model = tiny_llama(hidden_size=64).eval()
    ids = torch.randint(0, 100, (1, 256))
    rule = Rule("block_topk", k=1)
    outs = {}
    for name, plan, options in (
        ("plan block 64", Plan(default=rule, block=64), None),
        ("forced 64", Plan(default=rule), sparsecomp.KernelOptions(block_m=64, block_n=64, num_warps=4)),
        ("default 128", Plan(default=rule), None),
    ):
        compiled = sparsecomp.compile(model, plan, inner="eager", cost_model=False, kernel_options=options)
        with torch.no_grad():
            outs[name] = compiled(ids).logits
        if name == "plan block 64":
            assert {s.decision.option for s in sparsecomp.inspect(compiled).sites} == {"b64"}
    torch.testing.assert_close(outs["plan block 64"], outs["forced 64"])
    assert (outs["plan block 64"] - outs["default 128"]).abs().max() > 1e-3  # other blocks kept
