"""Eviction per head within a layer (DuoAttention's retrieval and streaming heads in one layer):
a layer's KV heads in groups, each group a static layer of its own over its heads (the whole past,
a StreamingLLM ring, or an evicting SnapKV / H2O budget), so that the streaming heads' share of the
cache is gone while the retrieval heads keep every key.

One attention call cannot read keys of different lengths per head, so a decode step attends per
group: the group's query heads (a KV head's query group) over the group's own keys, then the heads
back in order. Each group's attention is ``sparsecomp::cache_group_attention``, transformers'
SDPA kept opaque: sparsecomp's matcher reports it as a site of its own (``site#n``) and keeps it as
it is, since what it reads is what the cache keeps for those heads. The prompt's attention reads
the whole prompt for every head at once (one SDPA site, rewritten by the plan's prefill rules);
then each group keeps its share. The layer runs through ``"sparsecomp_sdpa"`` while
``cache.attached(model)`` holds (``runtime/partial_cache.py``; sparsecomp's ``generate`` holds it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.cache_utils import StaticLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .partial_cache import cut_to_keys, kept_length


@torch.library.custom_op("sparsecomp::cache_group_attention", mutates_args=())
def cache_group_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float, keeps: str
) -> torch.Tensor:
    """SDPA of a group of heads over the keys a cache keeps for them (``keeps`` says which, for the
    report); query heads a multiple of the KV heads."""
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


@cache_group_attention.register_fake
def _(q, k, v, mask, scale, keeps):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def take_heads(t: torch.Tensor, kv_heads: list[int], group: int = 1) -> torch.Tensor:
    """The rows of ``t`` (B, H, ...) of KV heads ``kv_heads``, ``group`` rows each (a KV head's query
    heads), by slices: no index tensor, which a CUDA graph capture could not copy to the device."""
    parts = [t[:, h * group : (h + 1) * group] for h in kv_heads]
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


@dataclass
class HeadGroup:
    kv_heads: list[int]  # the layer's KV heads this group holds, ascending
    layer: StaticLayer  # a static layer over those heads alone
    keeps: str  # what it keeps, for the report: "dense", "streaming:sink=...", ...


class HeadGroupsLayer(StaticLayer):
    """A static cache layer whose KV heads are kept in ``groups`` (each a static layer over its
    heads); ``slots``: the longest group's keys."""

    def __init__(self, max_cache_len: int, groups: list[HeadGroup], **kwargs):
        super().__init__(max_cache_len=max_cache_len, **kwargs)
        heads = sorted(h for g in groups for h in g.kv_heads)
        if heads != list(range(len(heads))):
            raise ValueError(f"head groups must hold each KV head once; got {[g.kv_heads for g in groups]}")
        self.groups = groups
        self.slots = max(kept_length(g.layer) for g in groups)
        self.prompt_seen = False  # set after the prompt's attention; reset() clears it

    @property
    def sublayers(self) -> list[StaticLayer]:
        return [g.layer for g in self.groups]

    def lazy_initialization(self, key_states, value_states, *args, **kwargs):
        for g in self.groups:
            g.layer.lazy_initialization(take_heads(key_states, g.kv_heads), take_heads(value_states, g.kv_heads))
        self.device = key_states.device
        self.batch_size, self.num_heads = key_states.shape[:2]
        self.cumulative_length = self.cumulative_length.to(self.device)
        if not torch.compiler.is_compiling():
            torch._dynamo.mark_static_address(self.cumulative_length)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        """Each group keeps its heads' share; the prompt's attention reads the prompt itself."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        for g in self.groups:
            g.layer.update(take_heads(key_states, g.kv_heads), take_heads(value_states, g.kv_heads), *args, **kwargs)
        self.cumulative_length.add_(key_states.shape[-2])
        return key_states, value_states

    def attend(self, module, query, key, value, mask, **kwargs):
        """The prompt: one SDPA over the prompt for every head, then the groups that choose from
        the queries keep their share. A decode step: each group's query heads over its own keys."""
        group = query.shape[1] // self.num_heads  # query heads per KV head
        if not self.prompt_seen:
            mask = cut_to_keys(mask, key.shape[-2])
            out = sdpa_attention_forward(module, query, key, value, mask, **kwargs)
            for g in self.groups:
                if hasattr(g.layer, "observe"):
                    q = take_heads(query, g.kv_heads, group)
                    kv = take_heads(key, g.kv_heads), take_heads(value, g.kv_heads)
                    g.layer.observe(q, *kv, mask, kwargs.get("scaling"))
            self.prompt_seen = True
            return out
        scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
        out = torch.empty_like(query)  # (B, Hq, Nq, D)
        for g in self.groups:
            q, keys, values = take_heads(query, g.kv_heads, group), g.layer.keys, g.layer.values
            group_mask = cut_to_keys(mask, keys.shape[-2])
            if hasattr(g.layer, "attention_mask"):
                group_mask = g.layer.attention_mask(q, group_mask)
            part = torch.ops.sparsecomp.cache_group_attention.default(q, keys, values, group_mask, scale, g.keeps)
            for i, h in enumerate(g.kv_heads):  # the query heads back in place
                out[:, h * group : (h + 1) * group] = part[:, i * group : (i + 1) * group]
            if hasattr(g.layer, "observe"):
                g.layer.observe(q, keys, values, group_mask, scale)
        return out.transpose(1, 2).contiguous(), None

    def state_tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for g in self.groups for t in getattr(g.layer, "state_tensors", tuple)())

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return max(self.slots, query_length), 0

    def reset(self) -> None:
        for g in self.groups:
            g.layer.reset()
        if self.is_initialized:
            self.cumulative_length.zero_()
        self.prompt_seen = False
