"""Generation through sparsecomp: every forward compiled, KV-cache writes kept, tokens equal to eager."""

import pytest
import torch
import torch.fx as fx
from tiny_models import DEVICE, tiny_llama

import sparsecomp
from sparsecomp.passes.fxutil import eliminate_dead_code

pytest.importorskip("transformers")

NEW_TOKENS = 6


def prompt(batch: int, n: int = 12, pad: int = 4):
    ids = torch.randint(1, 100, (batch, n), device=DEVICE)
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[1, :pad] = 0  # left padding: the second row is shorter
    return ids, mask


def generate(model, ids, mask, cache: str, scores: bool = False):
    kw = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    if cache == "static":
        kw["cache_implementation"] = "static"
    if scores:
        kw.update(return_dict_in_generate=True, output_logits=True)
    return model.generate(ids, attention_mask=mask, **kw)


def assert_same_generation(out, ref, atol=1e-4):
    """The sparse kernel's reference sums in another order than SDPA: fp32 logits agree to ~1e-6, and
    the tokens agree up to the first step where eager's top two logits are within that (a tie of
    random weights); every step's logits up to there agree."""
    steps = len(ref.logits)
    prompt_len = ref.sequences.shape[1] - steps
    for t in range(steps):
        torch.testing.assert_close(out.logits[t], ref.logits[t], atol=atol, rtol=1e-4)
        got, want = out.sequences[:, prompt_len + t], ref.sequences[:, prompt_len + t]
        if not torch.equal(got, want):
            top2 = ref.logits[t].float().topk(2, dim=-1).values
            margin = (top2[:, 0] - top2[:, 1])[got != want]
            assert (margin < atol).all(), f"step {t}: tokens differ with a clear margin {margin.tolist()}"
            return


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("batch", [1, 2])
def test_dense_generate_runs_compiled_and_equals_eager(cache, batch):
    model = tiny_llama().eval()
    ids, mask = prompt(batch)
    ref = generate(model, ids, mask, cache)
    compiled = sparsecomp.compile(model, "dense", inner="eager")
    out = generate(compiled, ids, mask, cache)
    assert torch.equal(out, ref)
    report = sparsecomp.inspect(compiled)
    phases = [g.phase() for g in report.graphs]
    assert phases[0] == "prefill" and "decode" in phases, str(report)  # every graph listed, not only the last
    assert sparsecomp.counters["rewritten"] == 0, str(report)  # dense heads are never a sparse rewrite
    decode = [s for g in report.graphs if g.phase() == "decode" for s in g.sites]
    assert decode and all("decode step" in s.reason for s in decode), str(report)
    assert "forward" not in model.__dict__  # generate put the model's own forward back


@pytest.mark.slow
def test_dense_generate_under_inductor_equals_eager():
    model = tiny_llama().eval()
    ids, mask = prompt(2)
    ref = generate(model, ids, mask, "static")
    out = generate(sparsecomp.compile(model, "dense"), ids, mask, "static")
    assert torch.equal(out, ref)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_sparse_decode_steps_are_rewritten_and_exact_when_the_window_covers_everything(cache):
    """A streaming window longer than the whole generation keeps every key: sparse rewrites of the
    prefill and of each decode step (causal, queries after the cache, padding) must give eager's tokens."""
    model = tiny_llama().eval()
    ids, mask = prompt(2)
    ref = generate(model, ids, mask, cache, scores=True)
    compiled = sparsecomp.compile(
        model,
        "streaming:sink=0,window=64",
        inner="eager",
        cost_model=False,
        kernel_options={"block_m": 16, "block_n": 16},
    )  # the rewrite is under test, not the decision (on a GPU the cost model keeps tiny sites dense)
    out = generate(compiled, ids, mask, cache, scores=True)
    assert_same_generation(out, ref)
    report = sparsecomp.inspect(compiled)
    decode = [s for g in report.graphs if g.phase() == "decode" for s in g.sites]
    assert decode and all(s.became == "sparse_attention" for s in decode), str(report)
    # Static lengths give the query offset as a number; symbolic ones, the queries after the cache.
    at_end = ("queries after the KV cache", "query offset")
    assert all(any(a in s.mask for a in at_end) and "key padding" in s.mask for s in decode), str(report)


def test_decode_step_structure_is_causal_with_the_query_at_the_end():
    model = tiny_llama().eval()
    ids, mask = prompt(1)
    compiled = sparsecomp.compile(model, "streaming:sink=2,window=4", inner="eager")
    generate(compiled, ids, mask, "dynamic")
    decode = [s for g in sparsecomp.inspect(compiled).graphs if g.phase() == "decode" for s in g.sites]
    assert decode and all(s.mask.startswith("causal") and "bidirectional" not in s.mask for s in decode)


def test_dead_code_elimination_keeps_in_place_writes():
    class CacheWrite(torch.nn.Module):
        def forward(self, cache, pos, new):
            cache.index_copy_(2, pos, new)  # result unused: a side effect only
            unused = new * 2  # noqa: F841  (dead: must go)
            return cache.sum()

    gm = fx.symbolic_trace(CacheWrite())
    removed = eliminate_dead_code(gm)
    targets = [n.target for n in gm.graph.nodes]
    assert "index_copy_" in targets and removed == 1
    cache = torch.zeros(1, 1, 4, 2)
    gm.recompile()
    gm(cache, torch.tensor([1]), torch.ones(1, 1, 1, 2))
    assert cache[0, 0, 1].tolist() == [1.0, 1.0]


def test_padded_batches_are_rewritten_at_every_length():
    """Under the default dynamic=None the second length compiles with symbolic shapes: the padding
    mask and the keys then have sizes of different symbols; it must still be proven."""
    model = tiny_llama().eval()
    # A window past every length keeps every key: the rewritten model must then equal eager.
    compiled = sparsecomp.compile(
        model,
        "streaming:sink=2,window=64",
        inner="eager",
        cost_model=False,
        kernel_options={"block_m": 16, "block_n": 16},
    )
    for n in (20, 24, 28):
        ids, mask = prompt(2, n=n, pad=3)
        for attention_mask in (mask, torch.ones_like(mask)):
            with torch.no_grad():
                out = compiled(ids, attention_mask=attention_mask).logits
                ref = model(ids, attention_mask=attention_mask).logits
            valid = attention_mask.bool()
            torch.testing.assert_close(out[valid], ref[valid], atol=2e-5, rtol=2e-5)
    graphs = sparsecomp.inspect(compiled).graphs
    assert len(graphs) >= 2
    assert all(s.became == "sparse_attention" for g in graphs for s in g.sites), str(sparsecomp.inspect(compiled))
