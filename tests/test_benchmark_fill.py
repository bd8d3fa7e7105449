"""The decode benchmarks fill a static cache as if a long prompt had been read: the next step must
then write and attend at that length (transformers counts written tokens itself and masks the rest,
whatever cache_position says)."""

import sys
from pathlib import Path

import pytest
import torch
from tiny_models import DEVICE, tiny_llama

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_a_filled_cache_is_written_and_attended_at_its_filled_length():
    from generate import fill_randomly
    from transformers import StaticCache

    model = tiny_llama().eval()
    cache = StaticCache(config=model.config, max_cache_len=64)
    mask = torch.ones(1, 64, dtype=torch.long, device=DEVICE)
    seen = []
    hook = model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["attention_mask"]), with_kwargs=True
    )
    with torch.no_grad():
        ids = torch.randint(0, model.config.vocab_size, (1, 4), device=DEVICE)
        model(input_ids=ids, attention_mask=mask, past_key_values=cache, cache_position=torch.arange(4, device=DEVICE))
        fill_randomly(cache, None, 40)
        filled = cache.layers[0].keys.clone()
        step = torch.tensor([40], device=DEVICE)
        model(input_ids=ids[:, :1], attention_mask=mask, past_key_values=cache, cache_position=step)
    hook.remove()
    written = (cache.layers[0].keys != filled).any(-1).any(1)[0]  # per slot: did the step write it
    assert written.nonzero().flatten().tolist() == [40]  # at the filled length, not after the prompt
    step_mask = seen[-1]
    visible = step_mask.sum() if step_mask.dtype == torch.bool else (step_mask == 0).sum()
    assert visible == 41  # the 40 filled keys and the new one
