"""A static KV cache that keeps only StreamingLLM's keys: the first ``sink`` tokens and the last
``window``, in a fixed ring of ``sink + window`` slots per layer (eviction for streaming heads).

A decode step whose rule is ``streaming(sink, window)`` reads exactly those keys, so a cache that
keeps nothing else gives the same tokens in a fixed memory, whatever the length: a 128K-token
sequence of a Llama-3-8B-shaped model keeps 16 GiB of K/V in a static cache and ``(sink + window)``
tokens' worth here (0.13 GiB for 64 + 1024).

Layout: token ``p`` lives in slot ``p`` while ``p < sink + window``, then sinks stay put and the
window wraps: slot ``sink + (p - sink) % window``. Attention over a set of keys does not depend on
their order (positions are rotated into the keys before they are cached), so the slots need no
reordering, and a decode step writes one slot. Once the ring is full every slot holds a kept key;
before, slots past the last token are masked as not yet written, as in a static cache. The mask
transformers builds from ``get_mask_sizes`` is therefore a causal mask over the slots: ``slot <=
position`` is every written slot.

The prompt goes in one update (its attention reads all of it: the update returns the prompt's own
K/V, then keeps the sink and window part); a multi-token update into a ring that holds tokens is an
error. Left padding is refused by sparsecomp's ``generate`` (padding would take sink slots). The
plan must read exactly these keys at decode: ``sparsecomp.compile(...).generate`` checks that every
ring layer's decode rule is ``streaming`` with the cache's sink and window.

Rings for some layers only (``layers=[...]``: streaming layers beside full ones that keep the whole
past for dense or selection rules): transformers builds one mask for all layers, sized for the full
ones, and its SDPA needs a mask as long as the keys. The attention implementation registered here as
``"sparsecomp_sdpa"`` is transformers' SDPA with the mask cut to each layer's keys (a ring's slots
see the mask's first columns: slot ``j`` is written once ``j <= position``, as the causal mask says);
such a model runs with ``model.set_attn_implementation("sparsecomp_sdpa")``. Needs transformers (the
``hf`` extra).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, StaticCache
from transformers.cache_utils import StaticLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .host_cache import allocate_up_front

SLICING_ATTENTION = "sparsecomp_sdpa"


def sdpa_with_mask_cut_to_keys(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention, the mask's key columns cut to the keys' count (a ring layer's
    keys are fewer than the full layers' the mask was built for)."""
    if attention_mask is not None and attention_mask.shape[-1] > key.shape[-2]:
        attention_mask = attention_mask[..., : key.shape[-2]]
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(SLICING_ATTENTION, sdpa_with_mask_cut_to_keys)
AttentionMaskInterface.register(SLICING_ATTENTION, sdpa_mask)


def kept_positions(n: int, sink: int, window: int) -> list[int]:
    """The tokens a ring keeps of the first ``n``, in order: the sinks, then the window's."""
    return [*range(min(sink, n)), *range(max(sink, n - window), n)]


class StreamingRingLayer(StaticLayer):
    """A static cache layer of ``max_cache_len`` tokens that stores only the first ``sink`` and the
    last ``window`` of them (``sink + window`` slots)."""

    def __init__(self, max_cache_len: int, sink: int, window: int, **kwargs):
        super().__init__(max_cache_len=max_cache_len, **kwargs)
        self.sink, self.window = sink, window
        self.slots = min(sink + window, max_cache_len)
        self.holds_tokens = False  # set by a multi-token update (the prompt); reset() clears it

    def lazy_initialization(self, key_states, value_states, *args, **kwargs):
        logical, self.max_cache_len = self.max_cache_len, self.slots  # StaticLayer allocates max_cache_len
        try:
            super().lazy_initialization(key_states, value_states, *args, **kwargs)
        finally:
            self.max_cache_len = logical

    def slot_of(self, position: torch.Tensor) -> torch.Tensor:
        """The ring slot of each token position."""
        return position.where(position < self.sink, self.sink + (position - self.sink) % self.window)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        if n == 1:  # a decode step: one slot (no host state read: the step stays graph-capturable)
            slot = self.slot_of(self.cumulative_length.view(1))
            self.cumulative_length.add_(1)
            self.keys.index_copy_(2, slot, key_states)
            self.values.index_copy_(2, slot, value_states)
            return self.keys, self.values
        if self.holds_tokens:
            raise RuntimeError(
                "StreamingKVCache takes its prompt in one update: a multi-token update into a ring that "
                "already holds tokens would need keys it has evicted (call cache.reset() for a new prompt)"
            )
        self.holds_tokens = True
        positions = torch.tensor(kept_positions(n, self.sink, self.window), device=self.keys.device)
        self.keys.index_copy_(2, self.slot_of(positions), key_states.index_select(2, positions))
        self.values.index_copy_(2, self.slot_of(positions), value_states.index_select(2, positions))
        self.cumulative_length.add_(n)
        if n <= self.slots:  # the prompt fits: slot = position, the ring is the cache
            return self.keys, self.values
        return key_states, value_states  # the prompt's attention reads all of it

    def load(self, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        """The ring after a prompt of ``length`` tokens, given the K/V of the tokens it keeps (their
        ``positions``, ascending): what the prompt's update would have written."""
        self.keys.index_copy_(2, self.slot_of(positions), keys)
        self.values.index_copy_(2, self.slot_of(positions), values)
        self.cumulative_length.fill_(length)
        self.holds_tokens = True

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(keys the attention reads, the first one's position): the ring's slots, or a longer
        prompt read whole."""
        return max(self.slots, query_length), 0

    def reset(self) -> None:
        super().reset()
        self.holds_tokens = False


class StreamingKVCache(StaticCache):
    """A ``transformers.StaticCache`` whose full-attention layers (or those of ``layers``, indices)
    keep only the first ``sink`` and the last ``window`` tokens (StreamingLLM's keys, in a ring):
    their memory stays ``sink + window`` tokens whatever the length. Pass it to ``generate`` as
    ``past_key_values`` with a plan whose decode rule on those layers is
    ``streaming:sink=...,window=...`` of the same sizes. Other arguments are ``StaticCache``'s;
    ``batch_size``, ``dtype`` and ``device`` allocate it up front."""

    def __init__(
        self, config, max_cache_len: int, *args, sink: int, window: int, layers=None, batch_size=None, dtype=None,
        device=None, **kwargs,
    ):  # fmt: skip
        if sink < 0 or window < 1:
            raise ValueError(f"StreamingKVCache needs sink >= 0 and window >= 1; got sink={sink}, window={window}")
        super().__init__(config, max_cache_len, *args, **kwargs)
        self.sink, self.window = sink, window
        full = [i for i, layer in enumerate(self.layers) if type(layer) is StaticLayer]
        rings = full if layers is None else sorted(set(layers))
        if not rings or not set(rings) <= set(full):
            raise ValueError(
                f"StreamingKVCache: layers={layers} must name some of this config's full-attention layers {full}"
            )
        for i in rings:
            self.layers[i] = StreamingRingLayer(self.layers[i].max_cache_len, sink, window)
        self.full_layer = next((i for i in full if i not in rings), None)  # sizes the shared mask
        if batch_size is not None and device is not None:
            allocate_up_front(self, config, batch_size, dtype, device)

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        """The one mask transformers builds for the full-attention layers is sized for a full layer
        where there is one (a ring reads its first columns)."""
        ring = isinstance(self.layers[layer_idx], StreamingRingLayer)
        index = self.full_layer if ring and self.full_layer is not None else layer_idx
        return super().get_mask_sizes(query_length, index)

    def check_generation(self, model, plan, attention_mask=None) -> None:
        """Raise, before a compiled ``generate`` runs, where this cache would change its answer: a
        decode rule that reads other keys than the ring's (a dense or retrieval head needs the
        whole past), or left padding (padded positions would take sink slots)."""
        from sparsecomp.plan import Rule

        kept = Rule("streaming", sink=self.sink, window=self.window)
        text = model.config.get_text_config(decoder=True)
        q_heads = text.num_attention_heads
        kv_heads = text.num_key_value_heads or q_heads
        for name, module in model.named_modules():
            index = getattr(module, "layer_idx", None)
            if index is None or not isinstance(self.layers[index], StreamingRingLayer):
                continue
            wrong = {str(r) for r in plan.rules_for(name, q_heads, kv_heads, "decode") if r != kept}
            if wrong:
                raise ValueError(
                    f"StreamingKVCache keeps {kept}'s keys, but the plan decodes {name} with {sorted(wrong)}: "
                    "those heads need keys the ring evicts (use a StaticCache, or that streaming rule)"
                )
        if self.full_layer is not None and model.config._attn_implementation != SLICING_ATTENTION:
            raise ValueError(
                "StreamingKVCache with rings for some layers only: the shared mask is sized for the full "
                f"layers; run the model with model.set_attn_implementation({SLICING_ATTENTION!r}) "
                "(transformers' SDPA with the mask cut to each layer's keys) before compiling"
            )
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(
                "StreamingKVCache does not take padded batches: padding would take the sink slots "
                "(generate the sequences one by one, or pad on the right)"
            )
