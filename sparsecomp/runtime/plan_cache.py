"""A static KV cache made for a plan: per layer and KV head it keeps only the keys the plan's decode
rule reads. Streaming heads keep a ring of sink + window keys (StreamingLLM, MoA's windows at a
fixed span, DuoAttention's streaming heads), SnapKV and H2O heads their budget (an evicting layer),
every other head the whole past. A layer whose KV heads all keep the same becomes a ring, an
evicting layer or a full one; a layer that mixes them keeps its heads in groups
(``runtime/head_groups.py``: DuoAttention's retrieval and streaming heads in one layer), where a
head that keeps the whole past must decode dense (a group's attention reads all it keeps).
"""

from __future__ import annotations

from transformers.cache_utils import StaticLayer

from sparsecomp.plan import Plan, Rule

from ..patterns.selection import mixed_group
from .evicting_cache import EVICTING_KINDS, EvictingLayer
from .head_groups import HeadGroup, HeadGroupsLayer
from .partial_cache import PartialKVCache
from .streaming_cache import StreamingRingLayer


def evicts(rule: Rule) -> bool:
    """Whether a head with this decode rule reads only part of the past, kept by a layer of its own."""
    return rule.kind == "streaming" or rule.kind in EVICTING_KINDS


def kept_layer(rule: Rule, max_cache_len: int) -> StaticLayer:
    """A static layer that keeps exactly the keys ``rule`` reads (all of them for a rule that
    does not evict)."""
    if rule.kind == "streaming":
        return StreamingRingLayer(max_cache_len, rule.sink, rule.window)
    if rule.kind in EVICTING_KINDS:
        return EvictingLayer(max_cache_len, rule)
    return StaticLayer(max_cache_len)


def attention_modules(model) -> dict[int, str]:
    """``layer_idx -> site name`` of the model's attention modules (the plan's site names)."""
    return {m.layer_idx: name for name, m in model.named_modules() if isinstance(getattr(m, "layer_idx", None), int)}


def kv_head_rules(plan: Plan, site: str, q_heads: int, kv_heads: int) -> list[Rule]:
    """The site's decode rule per KV head (its query heads share its keys, so they need one rule)."""
    rules = plan.rules_for(site, q_heads, kv_heads, "decode")
    group = q_heads // kv_heads
    if mixed := mixed_group(rules, group):
        h, shared = mixed
        raise ValueError(
            f"PlanKVCache: query heads {h * group}-{(h + 1) * group - 1} of {site} share KV head {h} and decode "
            f"with {shared}: a KV head's keys are kept for one rule"
        )
    return rules[::group]


class PlanKVCache(PartialKVCache):
    """A ``transformers.StaticCache`` for ``model`` that keeps, per layer and KV head, only the keys
    ``plan``'s decode rules read (a Plan, preset or .json path): pass it to sparsecomp's
    ``generate`` with a model compiled with the same plan (outside it, run the model inside
    ``cache.attached(model)``). ``batch_size``, ``dtype`` and ``device``
    allocate it up front; other arguments are ``StaticCache``'s."""

    def __init__(self, model, max_cache_len: int, plan, *args, **kwargs):
        text = model.config.get_text_config(decoder=True)
        self.q_heads = text.num_attention_heads
        self.kv_heads = text.num_key_value_heads or self.q_heads
        plan = Plan.from_any(plan)
        self.kept = {
            i: kv_head_rules(plan, site, self.q_heads, self.kv_heads) for i, site in attention_modules(model).items()
        }
        partial = [i for i, rules in self.kept.items() if any(map(evicts, rules))]
        if not partial:
            raise ValueError("PlanKVCache: the plan's decode rules read every key at every layer (use a StaticCache)")
        for i in partial:
            full = {str(r) for r in self.kept[i] if not evicts(r)}
            if len(set(self.kept[i])) > 1 and full - {"dense"}:
                raise ValueError(
                    f"PlanKVCache: layer {i} mixes evicted heads with {sorted(full - {'dense'})}: in a layer of head "
                    "groups each group's attention is dense over what it keeps, so the heads that keep every key "
                    "must decode dense (or give the whole layer one rule)"
                )
        super().__init__(model.config, max_cache_len, *args, layers=partial, make_layer=self._layer, **kwargs)

    def _layer(self, index: int, max_cache_len: int) -> StaticLayer:
        rules = self.kept[index]
        if len(set(rules)) == 1:
            return kept_layer(rules[0], max_cache_len)
        groups = [
            HeadGroup([h for h, r in enumerate(rules) if r == rule], kept_layer(rule, max_cache_len), str(rule))
            for rule in dict.fromkeys(rules)
        ]
        return HeadGroupsLayer(max_cache_len, groups)

    def kept_rules(self, index: int, q_heads: int, kv_heads: int) -> list[Rule]:
        return [r for r in self.kept[index] for _ in range(q_heads // kv_heads)]

    def check_generation(self, model, plan, attention_mask=None) -> None:
        """Raise, before a compiled ``generate`` runs, where this cache would change its answer: a
        decode rule other than the one a layer's head keeps the keys of, or left padding."""
        self.check_plan(model, plan, attention_mask)
