"""`sparsecomp demo`: compile a Llama-architecture model with a streaming plan, show the report,
check the outputs against a dense masked reference, and on a GPU time it against dense SDPA."""

from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F

import sparsecomp

SHAPES = {
    # name: (hidden, layers, q heads, kv heads, intermediate) with head_dim = hidden / q heads
    "tiny": (256, 4, 8, 2, 512),
    "llama3-8b": (4096, 32, 32, 8, 14336),
}


def build_model(shape: str, layers: int | None, dtype, device):
    try:
        from transformers import AutoModelForCausalLM, LlamaConfig
    except ImportError as e:
        raise SystemExit("sparsecomp demo builds a Hugging Face model: pip install 'sparsecomp[hf]'") from e

    hidden, n_layers, heads, kv_heads, inter = SHAPES[shape]
    cfg = LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers or n_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=inter,
        vocab_size=1024,
        max_position_embeddings=1 << 20,
        rope_theta=500000.0,
    )
    torch.manual_seed(0)
    with torch.device(device or "cpu"):  # initialized where it runs (a host-side init of 8B-shaped layers is slow)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    return model.eval()


@contextlib.contextmanager
def streaming_sdpa(sink: int, window: int):
    """Dense SDPA with the streaming pattern as an explicit N x N mask: the reference."""
    original = F.scaled_dot_product_attention

    def masked(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        n_q, n_k = q.shape[-2], k.shape[-2]
        i = torch.arange(n_q, device=q.device)[:, None]
        j = torch.arange(n_k, device=q.device)[None, :]
        keep = (j <= i) & ((i - j < window) | (j < sink))
        if attn_mask is not None:
            keep = keep & attn_mask
        return original(q, k, v, attn_mask=keep, dropout_p=dropout_p, scale=scale, enable_gqa=enable_gqa)

    F.scaled_dot_product_attention = masked
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _time_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=2, rep=10, return_mode="median")


def run_demo(
    shape="tiny",
    layers=None,
    seq_len=512,
    sink=16,
    window=64,
    device=None,
    dtype=None,
    check=True,
    block=None,
) -> dict:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    plan = f"streaming:sink={sink},window={window}"
    model = build_model(shape, layers, dtype, device)
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len), device=device)
    print(
        f"sparsecomp demo: Llama-architecture ({shape}, {model.config.num_hidden_layers} layers, random "
        f"weights), {seq_len} tokens, {dtype}, {device}; plan {plan}"
    )
    kernel_options = {"block_m": block, "block_n": block} if block else None
    # The demo shows the rewrite at every length; by default compile would keep short inputs dense.
    compiled = sparsecomp.compile(model, plan, kernel_options=kernel_options, dynamic=False, cost_model=False)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = compiled(ids, use_cache=False).logits
    result = {"seq_len": seq_len, "plan": plan, "first_call_s": time.perf_counter() - t0}
    print(sparsecomp.inspect(compiled))
    if device == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        nxn = seq_len * seq_len * model.config.num_attention_heads * 2 / 2**30
        print(
            f"peak GPU memory {result['peak_memory_gib']:.2f} GiB (one layer's N x N bf16 scores "
            f"would be {nxn:.1f} GiB)"
        )
    if check:
        with torch.no_grad(), streaming_sdpa(sink, window):
            ref = model(ids, use_cache=False).logits
        err = ((logits.float() - ref.float()).norm() / ref.float().norm()).item()
        tol = 2e-2 if dtype != torch.float32 else 1e-4
        result["relative_error"] = err
        print(
            f"relative error vs dense masked reference: {err:.2e} (tolerance {tol:.0e}) -> "
            f"{'OK' if err <= tol else 'MISMATCH'}"
        )
        if err > tol:
            raise SystemExit(1)
    if device == "cuda":
        result.update(_timings(model, compiled, ids, kernel_options))
    return result


def _timings(model, compiled, ids, kernel_options) -> dict:
    """Forward time of the sparse model against both dense paths a user could run instead: eager
    (SDPA's fused causal kernels) and torch.compile (which materializes an N x N mask), plus
    sparsecomp's dense plan; the speedup is against the best dense one."""
    dense_plan = sparsecomp.compile(model, "dense", kernel_options=kernel_options, dynamic=False, cost_model=False)
    runs = {
        "eager_sdpa_ms": model,
        "torch_compile_ms": torch.compile(model, dynamic=False),
        "sparsecomp_dense_ms": dense_plan,
        "sparsecomp_ms": compiled,
    }
    times = {}
    with torch.no_grad():
        for name, fn in runs.items():
            times[name] = _time_ms(lambda fn=fn: fn(ids, use_cache=False))
    best = min(times["eager_sdpa_ms"], times["torch_compile_ms"])
    times["speedup_vs_best_dense"] = best / times["sparsecomp_ms"]
    print(
        f"forward: eager SDPA {times['eager_sdpa_ms']:.2f} ms, torch.compile {times['torch_compile_ms']:.2f} ms, "
        f"sparsecomp dense plan {times['sparsecomp_dense_ms']:.2f} ms, sparsecomp {times['sparsecomp_ms']:.2f} ms: "
        f"{times['speedup_vs_best_dense']:.2f}x the best dense path "
        f"({times['torch_compile_ms'] / times['sparsecomp_ms']:.2f}x torch.compile)"
    )
    return times
