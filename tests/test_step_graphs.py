"""Decode steps replayed as CUDA graphs (``sparsecomp.compile(..., cuda_graphs=True)``): which calls
are graphed, the padded mask they run with, and (on a GPU) tokens equal to the compiled model's."""

import pytest
import torch
from test_decode_rules import decode_plan
from test_generate import NEW_TOKENS, generate, prompt
from tiny_models import DEVICE, tiny_llama

import sparsecomp
from sparsecomp.runtime.step_graphs import DecodeStepGraphs, graphable_cache

transformers = pytest.importorskip("transformers")
needs_cuda = pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")


def static_cache(model, length: int):
    return transformers.StaticCache(config=model.config, max_cache_len=length)


def test_only_initialized_static_caches_are_graphable():
    model = tiny_llama().eval()
    cache = static_cache(model, 32)
    assert not graphable_cache(cache)  # not allocated before the first forward
    ids, mask = prompt(1)
    model(input_ids=ids, attention_mask=mask, past_key_values=cache)
    assert graphable_cache(cache)
    assert not graphable_cache(transformers.DynamicCache())
    assert not graphable_cache(None)


def test_the_padded_mask_gives_the_same_logits():
    """generate lengthens the 2D mask every step; graphs pad it with zeros to the cache's length, as
    transformers does itself when it builds the attention mask: same logits, with left padding."""
    model = tiny_llama().eval()
    ids, mask = prompt(2)
    outs = []
    for pad in (False, True):
        cache = static_cache(model, 32)
        model(input_ids=ids, attention_mask=mask, past_key_values=cache)
        step_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        kwargs = dict(input_ids=ids[:, -1:], attention_mask=step_mask, past_key_values=cache,
                      cache_position=torch.tensor([ids.shape[1]], device=DEVICE))  # fmt: skip
        if pad:
            kwargs = DecodeStepGraphs._padded_mask(kwargs, cache)
            assert kwargs["attention_mask"].shape == (2, 32)
        outs.append(model(**kwargs).logits)
    torch.testing.assert_close(outs[1], outs[0], atol=0, rtol=0)


def test_calls_that_are_not_static_one_token_steps_run_as_they_are():
    calls = []
    graphs = DecodeStepGraphs(lambda *a, **kw: calls.append(kw) or "ran")
    ids = torch.ones(1, 5, dtype=torch.long)
    assert graphs(input_ids=ids, past_key_values=transformers.DynamicCache()) == "ran"
    assert graphs(input_ids=ids[:, :1]) == "ran"  # no cache
    assert len(calls) == 2 and graphs.captured == 0 and not graphs.seen


def test_generate_through_the_wrapper_is_unchanged_where_nothing_is_graphed():
    """generate reads the forward's signature to choose its inputs (position_ids for left padding):
    the wrapper keeps it, so a padded batch gets the plain compiled model's tokens (on CPU no step is
    graphed; a wrapper that hid the signature changed the padded row's positions)."""
    import inspect

    model = tiny_llama().eval()
    graphs = DecodeStepGraphs(model.forward)
    assert inspect.signature(graphs).parameters.keys() == inspect.signature(model.forward).parameters.keys()
    ids, mask = prompt(2, n=24)
    plan = decode_plan("double_sparsity:channels=4,ratio=0.25")
    plain = generate(sparsecomp.compile(model, plan, cost_model=False, inner="eager"), ids, mask, "static")
    torch._dynamo.reset()
    wrapped = generate(sparsecomp.compile(model, plan, cost_model=False, inner="eager", cuda_graphs=True),
                       ids, mask, "static")  # fmt: skip
    assert torch.equal(wrapped, plain)


class RerunGraph:
    """A stand-in for a CUDA graph on CPU: a replay runs the captured step again on its static
    inputs (what a graph does on the GPU, Python side effects aside). Capture runs the step where a
    CUDA graph only records it, so the replay that follows a capture is skipped."""

    device_type = DEVICE  # the test device: a stand-in on CPU and on a GPU alike

    def capture(self, step):
        self.step, self.ran = step, True
        out = step()
        self.outputs = {n: v for n, v in out.items() if isinstance(v, torch.Tensor)}
        return out

    def replay(self):
        if self.ran:
            self.ran = False
            return
        outputs = self.step()  # the static output is rewritten in place, as a graph's would be
        for name, value in outputs.items():
            if isinstance(value, torch.Tensor):
                self.outputs[name].copy_(value)

    @staticmethod
    def abandon():
        pass


def test_steps_replay_from_static_inputs_and_graphs_go_with_their_cache():
    """The capture and replay plumbing on CPU (RerunGraph): the first step compiles, the second is
    captured, later ones copy their inputs in and replay; outputs are copies holding the caller's
    cache; the graphs of a cache are dropped when it is."""
    import gc

    model = tiny_llama().eval()
    ids, mask = prompt(2, n=24)
    plan = decode_plan("double_sparsity:channels=4,ratio=0.25")
    plain = generate(sparsecomp.compile(model, plan, cost_model=False, inner="eager"), ids, mask, "static")
    torch._dynamo.reset()
    compiled = sparsecomp.compile(model, plan, cost_model=False, inner="eager", cuda_graphs=True)
    steps = compiled.generate.compiled_forward
    steps.graph_type = RerunGraph
    graphed = generate(compiled, ids, mask, "static")
    assert torch.equal(graphed, plain)
    assert steps.captured == 1 and steps.replayed == NEW_TOKENS - 3, steps.reasons
    assert f"generate: decode steps as CUDA graphs: 1 captured, {NEW_TOKENS - 3} steps replayed" in str(
        sparsecomp.inspect(compiled)
    )
    ((graph, _, stored),) = steps.graphs.values()
    assert not any(isinstance(v, transformers.Cache) for v in stored.values())  # the graph keeps no cache
    graph.step = None  # the stand-in's own reference to the step's inputs (a CUDA graph holds none)
    gc.collect()
    assert not steps.graphs and not steps.seen


def test_grad_mode_steps_are_not_graphed_and_reset_drops_the_graphs():
    model = tiny_llama().eval()
    ids, mask = prompt(1)
    cache = static_cache(model, 32)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=cache)
    steps = DecodeStepGraphs(model.forward, graph_type=RerunGraph)

    def step(t):
        position = torch.tensor([ids.shape[1] + t], device=DEVICE)
        return steps(input_ids=ids[:, -1:], past_key_values=cache, cache_position=position)

    with torch.enable_grad():
        for t in range(3):
            assert step(t).logits.requires_grad
    assert steps.captured == 0 and not steps.seen
    with torch.no_grad():
        for t in range(3, 6):
            step(t)
    assert steps.captured == 1 and len(steps.graphs) == 1
    steps.reset()
    assert not steps.graphs and not steps.seen


@needs_cuda
@pytest.mark.parametrize("rule", ["dense", "double_sparsity:channels=4,ratio=0.25"])
@pytest.mark.parametrize("batch", [1, 2])
def test_graphed_steps_give_the_compiled_models_tokens(rule, batch):
    model = tiny_llama().eval()
    ids, mask = prompt(batch, n=24)
    plan = decode_plan(rule)
    plain = generate(sparsecomp.compile(model, plan, cost_model=False), ids, mask, "static")
    torch._dynamo.reset()
    compiled = sparsecomp.compile(model, plan, cost_model=False, cuda_graphs=True)
    graphed = generate(compiled, ids, mask, "static")
    assert torch.equal(graphed, plain)
    steps = compiled.generate.compiled_forward
    assert steps.captured == 1 and steps.replayed == NEW_TOKENS - 3, steps.reasons  # step 1 compiles, 2 captures
