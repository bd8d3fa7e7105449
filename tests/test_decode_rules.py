"""Decode selection rules (Double Sparsity, Quest) through the compiler: plans, selection against
its reference, generate against eager, one decode graph for many steps."""

import pytest
import torch
from test_generate import NEW_TOKENS, assert_same_generation, generate, prompt
from tiny_models import DEVICE, tiny_llama

import sparsecomp
from sparsecomp.kernels.decode.selection import key_labels, label_scores_reference, page_bounds_reference
from sparsecomp.patterns import pattern
from sparsecomp.plan import Plan, Rule

pytest.importorskip("transformers")

SITES = ("model.layers.0.self_attn", "model.layers.1.self_attn")
CHANNELS = {name: [[0, 3, 5, 9], [1, 2, 8, 15]] for name in SITES}  # tiny_llama: 2 KV heads, head_dim 16


def decode_plan(rule: str, channels=CHANNELS) -> Plan:
    return Plan(decode_default=Rule.parse(rule), channels=channels)


def test_decode_kinds_are_refused_as_prefill_rules_and_plans_round_trip():
    with pytest.raises(ValueError, match="double_sparsity is a decode rule"):
        Plan.from_any("double_sparsity:channels=4,ratio=0.5")
    plan = decode_plan("double_sparsity:channels=4,ratio=0.25")
    back = Plan.from_json(plan.to_json())
    assert back.to_json()["version"] == 2 and back.channels == CHANNELS and back.decode_default == plan.decode_default
    with pytest.raises(ValueError, match="one list of channel indices per KV head"):
        Plan(channels={"model.layers.0.self_attn": [[0, 1], [2]]})


def test_missing_channels_are_an_error_at_the_decode_step():
    model = tiny_llama().eval()
    compiled = sparsecomp.compile(
        model, "prefill=dense;decode=double_sparsity:channels=4,ratio=0.5", inner="eager", cost_model=False
    )
    ids, mask = prompt(1)
    with pytest.raises(Exception, match="needs calibrated channels"):
        generate(compiled, ids, mask, "dynamic")


def test_double_sparsity_selects_the_top_label_scores():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 4, 1, 16, generator=g), torch.randn(2, 2, 40, 16, generator=g)
    channels = torch.tensor(CHANNELS[SITES[0]])
    q_last = torch.tensor([39, 39], dtype=torch.int32)
    select = pattern("double_sparsity").select
    tokens = select(q, k, None, q_last, channels, channels=4, ratio=0.0, k=7, heads="kv")
    from sparsecomp.kernels.decode.selection import query_channels

    scores = label_scores_reference(query_channels(q, channels), key_labels(k, channels), q_last, None, 2)
    want = scores.topk(7, dim=-1).indices.sort(-1).values
    assert torch.equal(tokens.long().sort(-1).values, want)
    per_query_head = select(q, k, None, q_last, channels, channels=4, ratio=0.0, k=7, heads="query")
    assert per_query_head.shape == (2, 4, 7)


def test_quest_selects_the_pages_with_the_highest_bounds():
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 4, 1, 16, generator=g), torch.randn(1, 2, 37, 16, generator=g)  # a partial last page
    q_last = torch.tensor([36], dtype=torch.int32)
    tokens = pattern("quest").select(q, k, None, q_last, None, page=8, ratio=0.0, pages=2, heads="kv")
    padded = torch.nn.functional.pad(k, (0, 0, 0, 3))
    pages = padded.view(1, 2, 5, 8, 16)
    ok = torch.arange(40).view(5, 8) < 37
    kmin = pages.masked_fill(~ok[None, None, :, :, None], float("inf")).amin(3)
    kmax = pages.masked_fill(~ok[None, None, :, :, None], float("-inf")).amax(3)
    bounds = page_bounds_reference(q, kmin, kmax, q_last, torch.ones(1, 5, dtype=torch.bool), 8, 2)
    top = bounds.topk(2, dim=-1).indices  # (1, 2, 2)
    want = (top[..., None] * 8 + torch.arange(8)).flatten(-2).sort(-1).values
    assert torch.equal(tokens.long().sort(-1).values, want)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize(
    "rule", ["double_sparsity:channels=4,ratio=1.0", "quest:page=4,ratio=1.0", "double_sparsity:channels=4,k=64"]
)
def test_selection_of_every_key_equals_eager_generation(rule, cache):
    """A budget covering every key keeps every key: decode steps through the selection and the decode
    kernel (padding, queries after the cache) must give eager's tokens and logits."""
    model = tiny_llama().eval()
    ids, mask = prompt(2)
    ref = generate(model, ids, mask, cache, scores=True)
    compiled = sparsecomp.compile(model, decode_plan(rule), inner="eager", cost_model=False)
    out = generate(compiled, ids, mask, cache, scores=True)
    assert_same_generation(out, ref)
    report = sparsecomp.inspect(compiled)
    decode = [s for g in report.graphs if g.phase() == "decode" for s in g.sites]
    assert decode and all(s.became == "sparse_decode" for s in decode), str(report)
    prefill = [s for g in report.graphs if g.phase() == "prefill" for s in g.sites]
    assert prefill and all(s.became != "sparse_decode" for s in prefill), str(report)
    if cache == "static":  # one decode graph serves every step, its state kept beside the cache
        assert sum(g.phase() == "decode" for g in report.graphs) == 1, str(report)
        assert (
            sparsecomp.counters["sparse_decode_cached_state"] == 2 and sparsecomp.counters["decode_state_written"] == 2
        )
    else:
        assert sparsecomp.counters["sparse_decode_state_from_k"] >= 2


@pytest.mark.parametrize("rule", ["double_sparsity:channels=4,k=8", "quest:page=4,pages=3"])
def test_state_kept_beside_the_static_cache_selects_as_the_state_summarized_from_k(rule):
    """A budget below the keys (a real selection): the static cache's label cache / page min-max,
    written at prefill and at each step, must choose what summarizing all of K (dynamic cache) does."""
    model = tiny_llama().eval()
    ids, mask = prompt(2, n=20)
    plan, follow = decode_plan(rule), dict(inner="eager", cost_model=False)
    from_k = generate(sparsecomp.compile(model, plan, **follow), ids, mask, "dynamic", scores=True)
    torch._dynamo.reset()  # else the static run compiles with the lengths the dynamic one saw vary: symbolic
    kept = generate(sparsecomp.compile(model, plan, **follow), ids, mask, "static", scores=True)
    assert (
        sparsecomp.counters["sparse_decode_cached_state"] > 0 and sparsecomp.counters["sparse_decode_state_from_k"] > 0
    )
    assert_same_generation(kept, from_k)


@pytest.mark.parametrize("rule", ["double_sparsity:channels=4,ratio=0.25", "quest:page=4,pages=2"])
def test_sparse_selection_generates_under_inductor(rule):
    """A real budget (a quarter of the keys, two pages) runs every step through Inductor; its first
    generated token comes from the prefill (dense) and equals eager's."""
    model = tiny_llama().eval()
    ids, mask = prompt(2, n=24)
    ref = generate(model, ids, mask, "static")
    out = generate(sparsecomp.compile(model, decode_plan(rule), cost_model=False), ids, mask, "static")
    assert out.shape == ref.shape and torch.equal(out[:, : ids.shape[1] + 1], ref[:, : ids.shape[1] + 1])
    assert sparsecomp.counters["sparse_decode"] >= 2


@pytest.mark.skipif(
    DEVICE == "cuda" and torch.__version__ < (2, 12),
    reason="torch 2.11's Inductor segfaults capturing CUDA graphs of a decode step, dense ones too",
)
def test_sparse_selection_generates_under_cuda_graphs():
    """mode="reduce-overhead" (CUDA graphs on a GPU; Inductor skips them for CPU graphs): the decode
    state is a static input, read and written in place, so replays give the tokens of plain Inductor."""
    model = tiny_llama().eval()
    ids, mask = prompt(2, n=24)
    plan = decode_plan("double_sparsity:channels=4,ratio=0.25")
    plain = generate(sparsecomp.compile(model, plan, cost_model=False), ids, mask, "static")
    torch._dynamo.reset()
    graphs = generate(sparsecomp.compile(model, plan, cost_model=False, mode="reduce-overhead"), ids, mask, "static")
    assert torch.equal(graphs, plain) and sparsecomp.counters["sparse_decode"] >= 2


def test_calibrated_channels_are_the_largest_q_k_contributions_and_drive_generation():
    model = tiny_llama().eval()
    ids = [torch.randint(1, 100, (32,)) for _ in range(2)]
    plan = sparsecomp.calibrate_channels(model, ids, "prefill=dense;decode=double_sparsity:channels=4,ratio=0.5")
    assert set(plan.channels) == set(SITES)
    assert all(len(heads) == 2 and all(len(h) == 4 for h in heads) for heads in plan.channels.values())
    # the importance ranks a channel whose q and k are scaled up first
    from sparsecomp.calibration.channels import channel_importance, top_channels

    q, k = torch.randn(1, 4, 20, 16), torch.randn(1, 2, 20, 16)
    q[..., 7] *= 10
    k[:, 1, :, 11] *= 10
    chosen = top_channels(channel_importance(q, k, None), 1)
    assert chosen == [[7], [11]]
    ids_b, mask = prompt(1)
    out = generate(sparsecomp.compile(model, plan, inner="eager", cost_model=False), ids_b, mask, "dynamic")
    assert out.shape[1] == ids_b.shape[1] + 6 and sparsecomp.counters["sparse_decode"] > 0


def test_decode_state_reaches_inductor_as_static_fakes(monkeypatch):
    """The state tensors go to Inductor as fakes of Dynamo's mode with plain int sizes: real ones
    would be faked with size symbols no input owns, and a guard on them (Inductor's 32-bit indexing
    check on CUDA) made the step's compile fail at 128K keys on the H200."""
    from sparsecomp.compiler import backend

    seen = []
    inner = backend._inner_compile

    def capture(gm, example_inputs, *args):
        if n := len(backend.state_inputs(gm)):  # the state comes after the graph's own inputs
            seen.extend(example_inputs[-n:])
        return inner(gm, example_inputs, *args)

    monkeypatch.setattr(backend, "_inner_compile", capture)
    model = tiny_llama().eval()
    ids, mask = prompt(2, n=24)
    generate(sparsecomp.compile(model, decode_plan("double_sparsity:channels=4,ratio=0.25"), cost_model=False),
             ids, mask, "static")  # fmt: skip
    assert sparsecomp.counters["sparse_decode_cached_state"] >= 2 and seen
    assert all(isinstance(t, torch._subclasses.FakeTensor) for t in seen)
    assert all(isinstance(n, int) for t in seen for n in t.shape)


def test_window_tokens_list_the_sinks_and_the_recent_keys_once():
    from sparsecomp.kernels.decode.selection import window_tokens

    key_ok = torch.ones(2, 12, dtype=torch.bool)
    key_ok[1, :3] = False  # a left-padded row: its sinks count from its first key
    key_ok[:, 10:] = False  # a static cache's rows not written yet
    tokens = window_tokens(key_ok, torch.randn(2, 2, 12, 4), n_sel=2, sink=2, window=4)
    assert tokens.shape == (2, 2, 6) and torch.equal(tokens[:, 0], tokens[:, 1])
    assert sorted(t for t in tokens[0, 0].tolist() if t >= 0) == [0, 1, 6, 7, 8, 9]
    assert sorted(t for t in tokens[1, 0].tolist() if t >= 0) == [3, 4, 6, 7, 8, 9]
    short = window_tokens(None, torch.randn(1, 1, 5, 4), n_sel=1, sink=2, window=4)  # sinks and window overlap
    assert sorted(t for t in short[0, 0].tolist() if t >= 0) == [0, 1, 2, 3, 4]


def test_merged_selections_give_each_head_its_own_rules_tokens():
    from sparsecomp.kernels.decode.selection import merge_selections

    a = torch.randint(0, 50, (2, 3, 5), dtype=torch.int32)
    b = torch.randint(0, 50, (2, 3, 2), dtype=torch.int32)
    merged = merge_selections([a, b], owner=(1, 0, 1))
    assert merged.shape == (2, 3, 5) and torch.equal(merged[:, 1], a[:, 1])
    assert torch.equal(merged[:, 0, :2], b[:, 0]) and (merged[:, 0, 2:] == -1).all()
    assert torch.equal(merged[:, 2, :2], b[:, 2])


def per_head_decode_plan(first_group: str, second_group: str) -> Plan:
    """tiny_llama's KV group 0 (query heads 0, 1) and group 1 (heads 2, 3) with their own decode rules."""
    rules = [Rule.parse(first_group)] * 2 + [Rule.parse(second_group)] * 2
    return Plan(decode_sites={name: rules for name in SITES}, channels=CHANNELS)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_a_selection_beside_streaming_heads_equals_dense_beside_them(cache):
    """Double Sparsity over every key on one KV group and a sink + window on the other, in one decode
    kernel call, give what dense heads beside the same streaming heads give (the prefill kernel's path)."""
    model = tiny_llama().eval()
    ids, mask = prompt(2, n=14)
    follow = dict(inner="eager", cost_model=False)
    streaming = "streaming:sink=2,window=4"
    ref = generate(sparsecomp.compile(model, per_head_decode_plan("dense", streaming), **follow), ids, mask, cache,
                   scores=True)  # fmt: skip
    torch._dynamo.reset()
    mixed = sparsecomp.compile(model, per_head_decode_plan("double_sparsity:channels=4,ratio=1.0", streaming), **follow)
    out = generate(mixed, ids, mask, cache, scores=True)
    assert_same_generation(out, ref)
    decode = [s for g in sparsecomp.inspect(mixed).graphs if g.phase() == "decode" for s in g.sites]
    assert decode and all(s.became == "sparse_decode" and "double_sparsity+streaming" in s.reason for s in decode)
    if cache == "static":
        assert sparsecomp.counters["decode_state_written"] == 2
        assert sparsecomp.counters["sparse_decode_cached_state"] > 0


def test_mixed_selection_with_real_budgets_generates_under_inductor():
    model = tiny_llama().eval()
    ids, mask = prompt(2, n=24)
    plan = per_head_decode_plan("quest:page=4,pages=2", "streaming:sink=2,window=4")
    out = generate(sparsecomp.compile(model, plan, cost_model=False), ids, mask, "static")
    assert out.shape == (2, 24 + NEW_TOKENS) and sparsecomp.counters["sparse_decode"] >= 2


@pytest.mark.parametrize(
    "rules,message",
    [
        (["double_sparsity:channels=4,k=8", "streaming:sink=2,window=4"] * 2, "share one selection and need one"),
        (["dense"] * 2 + ["quest:page=4,pages=2"] * 2, "mixes selection rules only with sink \\+ window rules"),
    ],
)
def test_decode_rules_one_selection_cannot_serve_are_an_error(rules, message):
    plan = Plan(decode_sites={name: [Rule.parse(r) for r in rules] for name in SITES}, channels=CHANNELS)
    ids, mask = prompt(1)
    with pytest.raises(Exception, match=message):
        generate(sparsecomp.compile(tiny_llama().eval(), plan, inner="eager", cost_model=False), ids, mask, "static")


def test_a_streaming_decode_step_counts_its_window_from_the_step_not_the_static_caches_end():
    """A static cache's rows not written yet are missing keys: the step's query sits at the last
    written one. Counted from the cache's end, the window held only unwritten rows (sinks alone)."""
    model = tiny_llama().eval()
    ids, mask = prompt(2, n=14)
    plan = Plan(decode_default=Rule.parse("streaming:sink=2,window=4"))
    follow = dict(inner="eager", cost_model=False)
    dynamic = generate(sparsecomp.compile(model, plan, **follow), ids, mask, "dynamic", scores=True)
    torch._dynamo.reset()
    static = generate(sparsecomp.compile(model, plan, **follow), ids, mask, "static", scores=True)
    assert_same_generation(static, dynamic)


@pytest.mark.parametrize("rule", ["double_sparsity:channels=4,k=8", "quest:page=4,pages=2"])
def test_state_is_kept_when_the_prefill_sees_only_the_prompts_keys(rule):
    """Batch 1, no padding: transformers >= 5.24 gives an empty static cache's prefill attention
    only the prompt's keys (a slice of the cache); the state must still be written there and kept."""
    model = tiny_llama().eval()
    ids, mask = prompt(1, n=20)
    plan, follow = decode_plan(rule), dict(inner="eager", cost_model=False)
    from_k = generate(sparsecomp.compile(model, plan, **follow), ids, mask, "dynamic", scores=True)
    torch._dynamo.reset()
    sparsecomp.counters.clear()
    kept = generate(sparsecomp.compile(model, plan, **follow), ids, mask, "static", scores=True)
    assert sparsecomp.counters["decode_state_written"] > 0 and sparsecomp.counters["sparse_decode_state_from_k"] == 0
    assert_same_generation(kept, from_k)
