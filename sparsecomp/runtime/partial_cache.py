"""What the caches that keep only part of the past share (``StreamingKVCache``'s rings,
``EvictingKVCache``'s budgets): a static cache some of whose layers are replaced, the one attention
implementation that runs such layers, and the checks made before a compiled ``generate``.

transformers builds one mask for all full-attention layers, sized for the full ones, and its SDPA
needs a mask as long as the keys. The attention implementation registered here as
``"sparsecomp_sdpa"`` is transformers' SDPA with the mask cut to each layer's keys (a layer of
fewer slots sees the mask's first columns). A layer that decides what to keep from the queries
(``EvictingLayer``: SnapKV's votes, H2O's accumulated attention) is reached through the attention
module while ``cache.attached(model)`` holds: the same function then gives it the step's mask and
shows it the step's queries after the attention. Needs transformers (the ``hf`` extra).
"""

from __future__ import annotations

import contextlib

from transformers import AttentionInterface, StaticCache
from transformers.cache_utils import StaticLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .host_cache import allocate_up_front

SLICING_ATTENTION = "sparsecomp_sdpa"
OBSERVING_LAYER = "sparsecomp_kv_layer"  # the attribute of an attention module naming its evicting layer


def sdpa_with_mask_cut_to_keys(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention, the mask's key columns cut to the keys' count (a partial
    layer's keys are fewer than the full layers' the mask was built for); an attached evicting
    layer gives the mask of the slots it holds and observes the step's queries."""
    if attention_mask is not None and attention_mask.shape[-1] > key.shape[-2]:
        attention_mask = attention_mask[..., : key.shape[-2]]
    layer = getattr(module, OBSERVING_LAYER, None)
    if layer is not None:
        attention_mask = layer.attention_mask(query, attention_mask)
    out = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if layer is not None:
        layer.observe(query, key, value, attention_mask, kwargs.get("scaling"))
    return out


AttentionInterface.register(SLICING_ATTENTION, sdpa_with_mask_cut_to_keys)
AttentionMaskInterface.register(SLICING_ATTENTION, sdpa_mask)


class PartialKVCache(StaticCache):
    """A ``transformers.StaticCache`` whose full-attention layers (or those of ``layers``, indices)
    are replaced by ``make_layer(max_cache_len)``; the others stay full. ``batch_size``, ``dtype``
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
            self.layers[i] = make_layer(self.layers[i].max_cache_len)
        self.full_layer = next((i for i in full if i not in partial), None)  # sizes the shared mask
        if batch_size is not None and device is not None:
            allocate_up_front(self, config, batch_size, dtype, device)

    def is_partial(self, index: int) -> bool:
        return type(self.layers[index]) is not StaticLayer and isinstance(self.layers[index], StaticLayer)

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        """The one mask transformers builds for the full-attention layers is sized for a full layer
        where there is one (a partial layer reads its first columns)."""
        index = self.full_layer if self.is_partial(layer_idx) and self.full_layer is not None else layer_idx
        return super().get_mask_sizes(query_length, index)

    def check_plan(self, model, plan, kept, attention_mask, *, needs_slicing: bool) -> None:
        """Raise where this cache would change the answer of ``plan``: a partial layer's decode rule
        other than ``kept`` (the rule whose keys it keeps), a model not running the attention
        implementation it needs, or left padding (padded positions would take kept slots)."""
        text = model.config.get_text_config(decoder=True)
        q_heads = text.num_attention_heads
        kv_heads = text.num_key_value_heads or q_heads
        name = type(self).__name__
        for site, module in model.named_modules():
            index = getattr(module, "layer_idx", None)
            if index is None or not self.is_partial(index):
                continue
            wrong = {str(r) for r in plan.rules_for(site, q_heads, kv_heads, "decode") if r != kept}
            if wrong:
                raise ValueError(
                    f"{name} keeps {kept}'s keys, but the plan decodes {site} with {sorted(wrong)}: "
                    "those heads need keys this cache drops (use a StaticCache, or that rule)"
                )
        if needs_slicing and model.config._attn_implementation != SLICING_ATTENTION:
            raise ValueError(
                f"{name}: run the model with model.set_attn_implementation({SLICING_ATTENTION!r}) before compiling "
                "(transformers' SDPA with the mask cut to each layer's keys, through which evicting layers "
                "see the queries)"
            )
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(
                f"{name} does not take padded batches: padding would take kept slots "
                "(generate the sequences one by one, or pad on the right)"
            )

    @contextlib.contextmanager
    def attached(self, model):
        """While held, each attention module of a layer that observes its queries reaches that layer
        (``sparsecomp_sdpa`` calls it); sparsecomp's ``generate`` holds it around the call."""
        observing = [
            (module, self.layers[module.layer_idx])
            for module in model.modules()
            if isinstance(getattr(module, "layer_idx", None), int)
            and module.layer_idx < len(self.layers)
            and hasattr(self.layers[module.layer_idx], "observe")
        ]
        for module, layer in observing:
            setattr(module, OBSERVING_LAYER, layer)
        try:
            yield self
        finally:
            for module, _ in observing:
                delattr(module, OBSERVING_LAYER)
