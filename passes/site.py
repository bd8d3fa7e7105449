"""AttentionSite: one matched attention in a Dynamo FX graph, with its stable name."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .fxutil import canonical_target, meta_val  # noqa: F401  (re-exported)
from .mask import MaskStructure


@dataclass
class AttentionSite:
    """A matched attention. ``k``/``v`` are the real KV heads once GQA repeats are folded."""

    name: str  # module path, e.g. "model.layers.3.self_attn": the key of plans and reports
    form: str  # which matching rule found it
    output: fx.Node  # the node whose value is the attention output (B, Hq, Nq, D)
    q: fx.Node
    k: fx.Node
    v: fx.Node
    scale: float | None = None  # None: 1 / sqrt(head_dim)
    causal: bool = False  # SDPA's is_causal flag
    mask: fx.Node | None = None  # bool mask (True = keep) as found, before canonicalization
    mask_is_additive: bool = False  # a float mask added to the scores
    softcap: float = 0.0
    dropout_p: float = 0.0
    kv_groups: int = 1  # query heads per KV head
    gqa_folded: bool = False  # a repeat of the KV heads was removed
    structure: MaskStructure | None = None
    fallback: str | None = None  # why the site cannot be rewritten (kept exactly as it was)
    notes: list[str] = field(default_factory=list)

    def _val(self, node):
        return meta_val(node)

    @property
    def shape(self) -> dict:
        q, k = self._val(self.q), self._val(self.k)
        b, hq, nq, d = q.shape
        return {
            "batch": b,
            "q_heads": hq,
            "kv_heads": k.shape[1],
            "q_len": nq,
            "kv_len": k.shape[2],
            "head_dim": d,
        }

    @property
    def dtype(self) -> torch.dtype:
        return self._val(self.q).dtype

    @property
    def device(self) -> torch.device:
        return self._val(self.q).device


_INDEX = re.compile(r"\[(\d+)\]")
_KEYED = re.compile(r"\._modules\[['\"]([^'\"]+)['\"]\]|\[['\"]([^'\"]+)['\"]\]")


def module_path(node: fx.Node) -> str:
    """The innermost module path of a node, as ``named_modules()`` spells it."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = str(list(stack.values())[-1][0])
    path = re.sub(r"^L\[['\"](self|fn|mod|model)['\"]\]\.?", "", path)
    path = _KEYED.sub(lambda m: "." + (m.group(1) or m.group(2)), path)
    path = _INDEX.sub(r".\1", path)
    return path.strip(".")


def unique_names(sites: list[AttentionSite]) -> None:
    """Give sites that share a module path (two attentions in one module) distinct names."""
    seen: dict[str, int] = {}
    for site in sites:
        base = site.name or "attention"
        n = seen.get(base, 0)
        seen[base] = n + 1
        site.name = base if n == 0 else f"{base}#{n}"
