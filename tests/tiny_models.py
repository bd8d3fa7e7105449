"""Tiny random-weight models shared by the tests."""

import os

# SPARSECOMP_TEST_DEVICE=cuda runs the tiny-model tests on a GPU (Inductor's Triton code, the real
# kernels instead of the interpreter)
DEVICE = os.environ.get("SPARSECOMP_TEST_DEVICE", "cpu")


def tiny_llama(hidden_size: int = 64, dtype=None, attn_implementation: str = "sdpa"):
    """A 2-layer Llama with 4 query / 2 KV heads (head_dim = hidden_size / 4)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn_implementation).to(DEVICE)
