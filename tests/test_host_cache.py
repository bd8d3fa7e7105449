"""Double Sparsity-Offload's storage: a static cache whose K/V live in host memory, read in place by
the GPU. Decoding from it must give the tokens of the same plan on an ordinary static cache."""

import pytest
import torch
from test_decode_rules import decode_plan
from test_generate import NEW_TOKENS, assert_same_generation, prompt
from tiny_models import DEVICE, tiny_llama

import sparsecomp

pytest.importorskip("transformers")


def generate_with(model, ids, mask, cache):
    return model.generate(
        ids, attention_mask=mask, past_key_values=cache, max_new_tokens=NEW_TOKENS, do_sample=False,
        pad_token_id=0, return_dict_in_generate=True, output_logits=True,
    )  # fmt: skip


@pytest.mark.parametrize("rule", ["double_sparsity:channels=4,k=8", "dense"])
def test_host_cache_generates_the_tokens_of_a_static_cache(rule):
    from transformers import StaticCache

    model = tiny_llama().eval()
    ids, mask = prompt(2, n=20)
    plan = decode_plan(rule) if rule != "dense" else "dense"
    length = ids.shape[1] + NEW_TOKENS
    on_device = generate_with(
        sparsecomp.compile(model, plan, inner="eager", cost_model=False), ids, mask,
        StaticCache(config=model.config, max_cache_len=length),
    )  # fmt: skip
    torch._dynamo.reset()
    host = sparsecomp.HostKVCache(
        config=model.config, max_cache_len=length, batch_size=2, dtype=torch.float32, device=DEVICE
    )  # allocated here, before the compiled forward (required on a GPU)
    assert all(layer.is_initialized for layer in host.layers)
    offloaded = generate_with(sparsecomp.compile(model, plan, inner="eager", cost_model=False), ids, mask, host)
    assert all(type(layer).__name__ == "HostStaticLayer" for layer in host.layers)
    assert torch.equal(offloaded.sequences, on_device.sequences)
    assert_same_generation(offloaded, on_device, atol=1e-5)
    if rule != "dense":
        assert sparsecomp.counters["sparse_decode"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-resident tensors are a GPU feature")
def test_host_resident_tensors_take_no_gpu_memory_and_are_read_and_written_by_kernels():
    from sparsecomp.runtime.host_cache import host_resident

    before = torch.cuda.memory_allocated()
    t = host_resident((4, 1024, 64), torch.bfloat16, torch.device("cuda"))
    assert t.is_cuda and torch.cuda.memory_allocated() == before and not t.any()
    src = torch.randn(4, 1024, 64, device="cuda", dtype=torch.bfloat16)
    rows = torch.tensor([3, 500, 1023], device="cuda")
    t.index_copy_(1, rows, src[:, rows])
    assert torch.equal(t[:, rows], src[:, rows]) and torch.equal(t.sum(1), src[:, rows].sum(1))


def test_memory_report_counts_host_kv_and_the_label_cache_per_layer():
    model = tiny_llama().eval()
    ids, mask = prompt(2, n=20)
    length = ids.shape[1] + NEW_TOKENS
    compiled = sparsecomp.compile(model, decode_plan("double_sparsity:channels=4,k=8"), inner="eager", cost_model=False)
    host = sparsecomp.HostKVCache(
        config=model.config, max_cache_len=length, batch_size=2, dtype=torch.float32, device=DEVICE
    )
    generate_with(compiled, ids, mask, host)
    memory = sparsecomp.inspect(compiled).memory(host)
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * 2 * cfg.num_key_value_heads * length * head_dim * 4  # K and V, batch 2, fp32
    labels = 2 * cfg.num_key_value_heads * length * 4 * 4  # 4 channels of K
    assert [row.sites for row in memory.layers] == [[f"model.layers.{i}.self_attn"] for i in range(2)]
    assert all(r.kv_host == kv and r.kv_gpu == 0 and r.dense == kv and r.state_gpu == labels for r in memory.layers)
    assert memory.total("gpu") == 2 * labels and "of a dense GPU cache" in str(memory)


def test_a_lazily_allocated_host_cache_is_refused_for_a_gpu_model_before_it_runs():
    model = tiny_llama().eval()
    lazy = sparsecomp.HostKVCache(config=model.config, max_cache_len=32)
    with pytest.raises(RuntimeError, match="must be allocated before the model runs"):
        lazy.check_allocated_for("cuda")
    lazy.check_allocated_for("cpu")  # host memory is the model's memory there: nothing to refuse
    early = sparsecomp.HostKVCache(
        config=model.config, max_cache_len=32, batch_size=1, dtype=torch.float32, device="cpu"
    )
    early.check_allocated_for("cuda")  # initialized layers pass
