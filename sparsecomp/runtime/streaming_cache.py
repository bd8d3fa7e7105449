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
past for dense or selection rules) run through ``"sparsecomp_sdpa"`` (transformers' SDPA with the
mask cut to each layer's keys, ``runtime/partial_cache.py``), which the cache switches the model to
while ``cache.attached(model)`` holds (sparsecomp's ``generate`` holds it): a ring's slots see the
mask's first columns (slot ``j`` is written once ``j <= position``, as the causal mask says).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import StaticLayer

from .partial_cache import SLICING_ATTENTION, PartialKVCache, allocate_slots

__all__ = ["SLICING_ATTENTION", "StreamingKVCache", "StreamingRingLayer", "kept_positions"]


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
        allocate_slots(self, self.slots, key_states, value_states, *args, **kwargs)

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


class StreamingKVCache(PartialKVCache):
    """A ``transformers.StaticCache`` whose full-attention layers (or those of ``layers``, indices)
    keep only the first ``sink`` and the last ``window`` tokens (StreamingLLM's keys, in a ring):
    their memory stays ``sink + window`` tokens whatever the length. Pass it to ``generate`` as
    ``past_key_values`` with a plan whose decode rule on those layers is
    ``streaming:sink=...,window=...`` of the same sizes. Other arguments are ``StaticCache``'s;
    ``batch_size``, ``dtype`` and ``device`` allocate it up front."""

    def __init__(self, config, max_cache_len: int, *args, sink: int, window: int, layers=None, **kwargs):
        if sink < 0 or window < 1:
            raise ValueError(f"StreamingKVCache needs sink >= 0 and window >= 1; got sink={sink}, window={window}")
        self.sink, self.window = sink, window
        super().__init__(config, max_cache_len, *args, layers=layers, **kwargs,
                         make_layer=lambda i, length: StreamingRingLayer(length, sink, window))  # fmt: skip

    def kept_rules(self, index: int, q_heads: int, kv_heads: int) -> list:
        from sparsecomp.plan import Rule

        return [Rule("streaming", sink=self.sink, window=self.window)] * q_heads

    def check_generation(self, model, plan, attention_mask=None) -> None:
        """Raise, before a compiled ``generate`` runs, where this cache would change its answer: a
        decode rule that reads other keys than the ring's (a dense or retrieval head needs the
        whole past), or left padding (padded positions would take sink slots)."""
        self.check_plan(model, plan, attention_mask)
