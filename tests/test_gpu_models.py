"""Every rule kind compiled inside a Llama-3-8B-shaped model on the GPU (Inductor, static and dynamic
shapes), not only its index builder alone: the builders must survive Inductor's GPU codegen there."""

import pytest
import torch

import sparsecomp
from sparsecomp.demo import build_model, streaming_sdpa

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

LENGTHS = (8192, 32768)
RULES = {
    "dense": "dense",
    "streaming": "streaming:sink=128,window=2048",
    "elastic": "elastic:sink=64,a=512,b=0.05",
    "vertical_slash": "vertical_slash:n_vertical=1000,n_slash=2048",
    "sample": "sample:alpha=0.95",
    "block_topk": "block_topk:k=16",
}


@pytest.fixture(scope="module")
def model():
    return build_model("llama3-8b", 1, torch.bfloat16, "cuda")


def _relative_error(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("kind", sorted(RULES))
def test_rule_kind_compiles_and_runs_in_a_model(model, kind, dynamic):
    torch._dynamo.reset()
    compiled = sparsecomp.compile(model, RULES[kind], dynamic=dynamic, cost_model=False)
    for n in LENGTHS:
        ids = torch.randint(0, model.config.vocab_size, (1, n), device="cuda")
        with torch.no_grad():
            logits = compiled(ids, use_cache=False, logits_to_keep=64).logits
        assert torch.isfinite(logits).all(), (kind, n)
        site = sparsecomp.inspect(compiled).graphs[-1].sites[0]
        expected = "sdpa_causal" if kind == "dense" else "sparse_attention"
        assert site.became == expected, str(sparsecomp.inspect(compiled))
        if kind in ("dense", "streaming") and n == LENGTHS[0]:
            reference = streaming_sdpa(128, 2048) if kind == "streaming" else torch.no_grad()
            with torch.no_grad(), reference:
                ref = model(ids, use_cache=False, logits_to_keep=64).logits
            assert _relative_error(logits, ref) < 2e-2, (kind, n)


def test_generate_with_a_static_cache_equals_eager_on_the_gpu():
    """Static cache (what transformers recommends for torch.compile), batch 2 with left padding; fp32
    so that Inductor's fused arithmetic cannot flip a near-tie of random weights' logits."""
    torch._dynamo.reset()
    small = build_model("tiny", None, torch.float32, "cuda")
    ids = torch.randint(1, small.config.vocab_size, (2, 64), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, cache_implementation="static")
    ref = small.generate(ids, **kw)
    out = sparsecomp.compile(small, "dense").generate(ids, **kw)
    assert torch.equal(out, ref)
