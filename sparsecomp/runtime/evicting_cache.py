"""A static KV cache whose layers keep a fixed budget of keys per KV head, chosen by importance
(eviction for SnapKV and H2O heads): ``k`` slots per head in place of ``max_cache_len``.

What a layer keeps is what the decode rule ``snapkv(...)`` or ``h2o(...)`` reads over a full
static cache (``patterns/snapkv.py``, ``patterns/h2o.py``): at a step whose key is at position
``L`` the ``window`` keys ``(L - window, L]`` and, of the keys before them, the ``k - window``
ranked highest (SnapKV: the votes of the prompt's last queries, or, for keys written while decoding,
none (``decoded="window"``) or a rank above every vote, the most recent first (``"kept"``);
H2O: the attention accumulated so far). Each step one key leaves the window and joins the ranked
ones, so keeping the top ``k - window`` of them means dropping the lowest one: the new key takes
its slot (or an empty one while the cache fills). A key dropped once never returns, so the slots
hold, step after step, exactly the keys the rule reads, and the attention over them is dense.

The queries decide what is kept (SnapKV's votes at the end of the prompt, each H2O step's
attention weights), and a cache update sees only keys: the layer is reached through the attention
module while ``cache.attached(model)`` holds (sparsecomp's ``generate`` holds it; the model then
runs ``"sparsecomp_sdpa"``, ``runtime/partial_cache.py``). The prompt's attention reads the whole
prompt; after it, the layer keeps its share of the prompt's K/V. Each decode step: the cache update
picks the slot (a rank per slot beside the cache: argmin, no host sync, graph-capturable), the
attention reads the held slots, and H2O adds the step's weights to the ranks.

Ties: the prompt's top keys are torch.topk's (as the rule's), and a step drops the first of equal
lowest ranks; SnapKV's max-pooled votes tie between neighbours, so where equal votes straddle the
budget this cache and the rule over a full cache may keep different (equally voted) keys.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import StaticLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from sparsecomp.kernels.decode.selection import top_tokens
from sparsecomp.plan import Rule

from ..patterns.h2o import prompt_attention
from ..patterns.selection import budget
from ..patterns.snapkv import _RECENT_FIRST, prompt_votes
from .partial_cache import PartialKVCache, allocate_slots, cut_to_keys

EVICTING_KINDS = ("snapkv", "h2o")
_EMPTY = torch.finfo(torch.float32).min  # an empty slot's rank when choosing one: above a dropped key's


class EvictingLayer(StaticLayer):
    """A static cache layer of ``max_cache_len`` tokens that stores, per KV head, the keys its
    ``rule`` (snapkv or h2o) reads: ``slots`` of them, with each slot's rank and token position."""

    def __init__(self, max_cache_len: int, rule: Rule, **kwargs):
        super().__init__(max_cache_len=max_cache_len, **kwargs)
        params = dict(rule.params)
        self.rule, self.params = rule, params
        self.slots = budget(params["k"], params["ratio"], max_cache_len)
        self.window = min(params["window"], self.slots)  # a budget below the window is all window
        self.holds_tokens = False  # set by the prompt's update; reset() clears it
        self.prompt_kept = False  # set once the prompt's attention chose the kept keys

    def lazy_initialization(self, key_states, value_states, *args, **kwargs):
        allocate_slots(self, self.slots, key_states, value_states, *args, **kwargs)
        shape = (self.batch_size, self.num_heads, self.slots)
        self.rank = torch.zeros(shape, dtype=torch.float32, device=self.device)
        self.position = torch.full(shape, -1, dtype=torch.int64, device=self.device)  # -1: empty
        if not torch.compiler.is_compiling():
            torch._dynamo.mark_static_address(self.rank)
            torch._dynamo.mark_static_address(self.position)

    def state_tensors(self) -> tuple[torch.Tensor, ...]:
        """What the layer keeps beside its K/V (memory accounting): each slot's rank and position."""
        return (self.rank, self.position) if self.is_initialized else ()

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if not self.holds_tokens:  # the prompt: its attention reads all of it, then observe() keeps a share
            self.holds_tokens = True
            self.cumulative_length.add_(key_states.shape[-2])
            return key_states, value_states
        if key_states.shape[-2] != 1:
            raise RuntimeError(
                "EvictingKVCache takes its prompt in one update and one token per step after it: a "
                "multi-token update would need keys it has dropped (call cache.reset() for a new prompt)"
            )
        if not self.prompt_kept:
            raise RuntimeError(
                "EvictingKVCache: the prompt's keys were never chosen (the attention did not observe its "
                "queries): run the model inside cache.attached(model) (sparsecomp's generate does)"
            )
        step = self.cumulative_length.view(1)  # the new key's position
        slot = self._slot_for(step)[:, :, None]  # (B, H, 1)
        b, h = slot.shape[:2]
        self.keys.scatter_(2, slot[..., None].expand(-1, -1, -1, self.k_head_dim), key_states)
        self.values.scatter_(2, slot[..., None].expand(-1, -1, -1, self.v_head_dim), value_states)
        self.position.scatter_(2, slot, step.expand(b, h, 1))
        self.rank.scatter_(2, slot, self._new_key_rank(step).expand(b, h, 1))
        self.cumulative_length.add_(1)
        return self.keys, self.values

    def _slot_for(self, step: torch.Tensor) -> torch.Tensor:
        """(B, H): the slot of the key at ``step``: that of the lowest-ranked key outside the new
        window (the one the rule stops reading), an empty one while the lowest is still kept."""
        held = self.position >= 0
        outside = held & (self.position <= step - self.window)
        rank = self.rank.where(outside, float("inf")).masked_fill(~held, _EMPTY)
        return rank.argmin(-1)

    def _new_key_rank(self, step: torch.Tensor) -> torch.Tensor:
        """A key written while decoding: no votes (SnapKV, read in the window only), above every
        vote, the most recent first (SnapKV, decoded=kept), or no attention yet (H2O)."""
        if self.rule.kind == "h2o":
            return torch.zeros_like(step, dtype=torch.float32)
        if self.params["decoded"] == "kept":
            return _RECENT_FIRST + step.float()  # exact in fp32 below 2^24 keys
        return torch.full_like(step, float("-inf"), dtype=torch.float32)

    def attend(self, module, query, key, value, mask, **kwargs):
        """transformers' SDPA over the held slots (the prompt: over the whole prompt), then
        ``observe``."""
        mask = self.attention_mask(query, cut_to_keys(mask, key.shape[-2]))
        out = sdpa_attention_forward(module, query, key, value, mask, **kwargs)
        self.observe(query, key, value, mask, kwargs.get("scaling"))
        return out

    def attention_mask(self, query, mask):
        """A decode step reads the held slots (every sequence holds the same slots): (B, 1, 1, slots)."""
        if not self.prompt_kept:
            return mask
        return (self.position[:, :1] >= 0)[:, :, None, :]

    def observe(self, query, key, value, mask, scale) -> None:
        """After the attention: of the prompt, the layer keeps its share; an H2O step adds its weights."""
        scale = query.shape[-1] ** -0.5 if scale is None else scale
        if not self.prompt_kept:
            self._keep_prompt(query, key, value, mask, scale)
        elif self.rule.kind == "h2o":
            self._add_step_attention(query, scale)

    def _keep_prompt(self, query, key, value, mask, scale: float) -> None:
        """The keys the first decode step reads besides its own: the last ``window - 1`` of the
        prompt and the ``slots - window`` ranked highest before them, in slots ``[0, count)``."""
        n = key.shape[2]
        mask = mask if mask is None or mask.dtype == torch.bool else mask == 0
        if self.rule.kind == "snapkv":
            params = {name: self.params[name] for name in ("observe", "pool")}
            (rank,) = prompt_votes(query, key, mask, True, None, n, scale=scale, **params)
        else:
            (rank,) = prompt_attention(query, key, mask, True, None, n, scale=scale)
        recent = min(self.window - 1, n)
        ranked = min(self.slots - self.window, n - recent)
        index = torch.arange(n, device=key.device)
        chosen = top_tokens(rank.masked_fill(index >= n - recent, float("-inf")), ranked).long()
        window = index[n - recent :].expand(*chosen.shape[:2], recent)
        kept = torch.cat([chosen, window], -1).sort(-1).values  # (B, H, count), ascending
        count = kept.shape[-1]
        rows = kept[..., None]
        self.keys[:, :, :count].copy_(key.gather(2, rows.expand(-1, -1, -1, key.shape[-1])))
        self.values[:, :, :count].copy_(value.gather(2, rows.expand(-1, -1, -1, value.shape[-1])))
        self.position[..., :count].copy_(kept)
        self.position[..., count:].fill_(-1)
        self.rank[..., :count].copy_(rank.gather(2, kept))
        self.prompt_kept = True

    def _add_step_attention(self, query, scale: float) -> None:
        """H2O: the step's softmax weights (its last query row, summed over each KV group's query
        heads) added to the ranks of the held keys."""
        b, hq, _, d = query.shape
        held = self.position >= 0
        rows = query[:, :, -1].float().reshape(b, self.num_heads, hq // self.num_heads, d)
        logits = (rows @ self.keys.float().transpose(-1, -2)) * scale  # (B, H, G, slots)
        weights = torch.softmax(logits.masked_fill(~held[:, :, None], float("-inf")), -1).sum(2)
        self.rank.add_(weights.masked_fill(~held, 0.0))

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(keys the attention reads, the first one's position): the prompt read whole, then the slots."""
        return max(self.slots, query_length), 0

    def reset(self) -> None:
        super().reset()
        if self.is_initialized:
            self.position.fill_(-1)
            self.rank.zero_()
        self.holds_tokens = self.prompt_kept = False


class EvictingKVCache(PartialKVCache):
    """A ``transformers.StaticCache`` whose full-attention layers (or those of ``layers``, indices)
    keep, per KV head, only the keys the decode rule ``rule`` (``snapkv`` or ``h2o``, a Rule or its
    text) reads: ``k`` (or ``ratio`` of ``max_cache_len``) keys per head whatever the length. Pass it
    to sparsecomp's ``generate`` as ``past_key_values`` with a plan whose decode rule on those layers
    is that rule (outside it, run the model inside ``cache.attached(model)``). Other
    arguments are ``StaticCache``'s; ``batch_size``, ``dtype`` and ``device`` allocate it up front."""

    def __init__(self, config, max_cache_len: int, *args, rule, layers=None, **kwargs):
        self.rule = Rule.parse(rule) if isinstance(rule, str) else rule
        if self.rule.kind not in EVICTING_KINDS:
            raise ValueError(f"EvictingKVCache keeps the keys of a {' or '.join(EVICTING_KINDS)} rule; got {rule}")
        if dict(self.rule.params)["heads"] != "kv":
            raise ValueError(f"EvictingKVCache keeps keys per KV head; got {self.rule}")
        super().__init__(config, max_cache_len, *args, layers=layers, **kwargs,
                         make_layer=lambda i, length: EvictingLayer(length, self.rule))  # fmt: skip

    def kept_rules(self, index: int, q_heads: int, kv_heads: int) -> list:
        return [self.rule] * q_heads

    def check_generation(self, model, plan, attention_mask=None) -> None:
        """Raise, before a compiled ``generate`` runs, where this cache would change its answer: a
        decode rule other than the cache's on its layers, or left padding."""
        self.check_plan(model, plan, attention_mask)
