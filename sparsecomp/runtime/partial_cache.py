"""What the caches that keep only part of the past share (``StreamingKVCache``'s rings,
``EvictingKVCache``'s budgets, ``PlanKVCache``'s per-head mixes): a static cache some of whose
layers are replaced, the one attention implementation that runs such layers, and the checks made
before a compiled ``generate``.

transformers builds one mask for all full-attention layers, sized for the full ones, and its SDPA
needs a mask as long as the keys. The attention implementation registered here as
``"sparsecomp_sdpa"`` is transformers' SDPA with the mask cut to each layer's keys (a layer of
fewer slots sees the mask's first columns). A layer that decides what to keep from the queries
(``EvictingLayer``: SnapKV's votes, H2O's accumulated attention) or keeps its heads in groups of
their own (``HeadGroupsLayer``) is reached through the attention module while
``cache.attached(model)`` holds: the same function then lets it run the attention (``attend``).
Needs transformers (the ``hf`` extra).
"""

from __future__ import annotations

import contextlib

from transformers import AttentionInterface, StaticCache
from transformers.cache_utils import StaticLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .host_cache import allocate_up_front

SLICING_ATTENTION = "sparsecomp_sdpa"
OBSERVING_LAYER = "sparsecomp_kv_layer"  # an attention module's attribute: the cache layer running its attention


def cut_to_keys(mask, n_keys: int):
    """The mask's first ``n_keys`` key columns (a partial layer's keys are fewer than the full
    layers' the shared mask was built for)."""
    return mask[..., :n_keys] if mask is not None and mask.shape[-1] > n_keys else mask


def sdpa_with_mask_cut_to_keys(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention, the mask cut to the keys' count; an attached layer that
    decides from the queries (``attend``) runs the attention itself."""
    layer = getattr(module, OBSERVING_LAYER, None)
    if layer is not None:
        return layer.attend(module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, cut_to_keys(attention_mask, key.shape[-2]), **kwargs)


AttentionInterface.register(SLICING_ATTENTION, sdpa_with_mask_cut_to_keys)
AttentionMaskInterface.register(SLICING_ATTENTION, sdpa_mask)


def allocate_slots(layer: StaticLayer, slots: int, key_states, value_states, *args, **kwargs) -> None:
    """StaticLayer's allocation of ``layer``, ``slots`` keys per head in place of its whole length
    (which it keeps: masks and budgets are of the logical cache)."""
    logical, layer.max_cache_len = layer.max_cache_len, slots
    try:
        StaticLayer.lazy_initialization(layer, key_states, value_states, *args, **kwargs)
    finally:
        layer.max_cache_len = logical


def kept_length(layer) -> int:
    """How many keys per head a static layer holds: its slots (a ring, an evicting layer, the
    longest group of a head-grouped one), else its whole length."""
    return getattr(layer, "slots", layer.max_cache_len)


class PartialKVCache(StaticCache):
    """A ``transformers.StaticCache`` whose full-attention layers (or those of ``layers``, indices)
    are replaced by ``make_layer(index, max_cache_len)``; the others stay full. ``batch_size``, ``dtype``
    and ``device`` allocate it up front."""

    def __init__(self, config, max_cache_len: int, *args, make_layer, layers=None, batch_size=None, dtype=None,
                 device=None, **kwargs):  # fmt: skip
        super().__init__(config, max_cache_len, *args, **kwargs)
        full = [i for i, layer in enumerate(self.layers) if type(layer) is StaticLayer]
        partial = full if layers is None else sorted(set(layers))
        if not partial or not set(partial) <= set(full):
            raise ValueError(
                f"{type(self).__name__}: layers={layers} must name some of this config's full-attention layers {full}"
            )
        for i in partial:
            self.layers[i] = make_layer(i, self.layers[i].max_cache_len)
        self.full_layer = next((i for i in full if i not in partial), None)  # a layer left whole
        # the one mask transformers builds for the full-attention layers is sized for the longest
        self.mask_layer = max(full, key=lambda i: kept_length(self.layers[i]))
        if batch_size is not None and device is not None:
            allocate_up_front(self, config, batch_size, dtype, device)

    def is_partial(self, index: int) -> bool:
        return type(self.layers[index]) is not StaticLayer and isinstance(self.layers[index], StaticLayer)

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        """The one mask transformers builds for the full-attention layers is sized for the longest
        of them (a partial layer reads its first columns)."""
        index = self.mask_layer if self.is_partial(layer_idx) else layer_idx
        return super().get_mask_sizes(query_length, index)

    def kept_rules(self, index: int, q_heads: int, kv_heads: int) -> list:
        """The decode rule, per query head, whose keys partial layer ``index`` keeps."""
        raise NotImplementedError

    def check_plan(self, model, plan, attention_mask) -> None:
        """Raise where this cache would change the answer of ``plan``: a partial layer's decode rule
        other than the one whose keys it keeps, or left padding (padded positions would take kept
        slots)."""
        text = model.config.get_text_config(decoder=True)
        q_heads = text.num_attention_heads
        kv_heads = text.num_key_value_heads or q_heads
        name = type(self).__name__
        for site, module in model.named_modules():
            index = getattr(module, "layer_idx", None)
            if index is None or not self.is_partial(index):
                continue
            kept = self.kept_rules(index, q_heads, kv_heads)
            planned = plan.rules_for(site, q_heads, kv_heads, "decode")
            wrong = sorted({f"{p} (keeps {k})" for p, k in zip(planned, kept, strict=True) if p != k})
            if wrong:
                raise ValueError(
                    f"{name} keeps other keys than the plan decodes {site} with: {wrong}; those heads need "
                    "keys this cache drops (use a StaticCache, or a cache made for this plan)"
                )
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(
                f"{name} does not take padded batches: padding would take kept slots "
                "(generate the sequences one by one, or pad on the right)"
            )

    @contextlib.contextmanager
    def attached(self, model):
        """While held, the model runs ``sparsecomp_sdpa`` and each attention module of a layer that
        runs its own attention reaches that layer; sparsecomp's ``generate`` holds it around the
        call (a compiled model compiles its graphs for it: they guard on the implementation)."""
        previous = model.config._attn_implementation
        if previous != SLICING_ATTENTION:
            model.set_attn_implementation(SLICING_ATTENTION)
        observing = [
            (module, self.layers[module.layer_idx])
            for module in model.modules()
            if isinstance(getattr(module, "layer_idx", None), int)
            and module.layer_idx < len(self.layers)
            and hasattr(self.layers[module.layer_idx], "attend")
        ]
        for module, layer in observing:
            setattr(module, OBSERVING_LAYER, layer)
        try:
            yield self
        finally:
            for module, _ in observing:
                delattr(module, OBSERVING_LAYER)
            if previous != SLICING_ATTENTION:
                model.set_attn_implementation(previous)
