"""The decode benchmarks fill a static cache as if a long prompt had been read: the next step must
then write and attend at that length (transformers counts written tokens itself and masks the rest,
whatever cache_position says)."""

import sys
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_llama

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_a_filled_cache_is_written_and_attended_at_its_filled_length():
    from generate import fill_randomly
    from transformers import StaticCache

    model = tiny_llama().eval()
    cache = StaticCache(config=model.config, max_cache_len=64)
    mask = torch.ones(1, 64, dtype=torch.long)
    seen = []
    hook = model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["attention_mask"]), with_kwargs=True
    )
    with torch.no_grad():
        ids = torch.randint(0, model.config.vocab_size, (1, 4))
        model(input_ids=ids, attention_mask=mask, past_key_values=cache, cache_position=torch.arange(4))
        fill_randomly(cache, None, 40)
        model(input_ids=ids[:, :1], attention_mask=mask, past_key_values=cache, cache_position=torch.tensor([40]))
    hook.remove()
    keys = cache.layers[0].keys
    assert keys[:, :, 40].abs().sum() > 0 and keys[:, :, 4].abs().sum() == 0  # written at 40, not at 4
    step_mask = seen[-1]
    visible = step_mask.sum() if step_mask.dtype == torch.bool else (step_mask == 0).sum()
    assert visible == 41  # the 40 filled keys and the new one
