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
    module_key: str = ""  # Dynamo's key of the innermost module (``str(id(module))`` for most modules)
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
# The root of a Dynamo source path: a local of the compiled frame (``L['self']``; ``L['args'][0]``
# when the forward goes through a ``*args`` wrapper such as transformers' output capturing),
# with any item subscripts on it. The module path starts after it.
_ROOT = re.compile(r"^L\[['\"][^'\"]+['\"]\](?:\[\d+\]|\[['\"][^'\"]+['\"]\])*")


def _innermost(node: fx.Node) -> tuple[str, str]:
    """(Dynamo's key, source path) of the innermost module a node was traced in."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    key, (path, _cls) = list(stack.items())[-1]
    return str(key), str(path)


def module_path(node: fx.Node) -> str:
    """The innermost module path of a node, as ``named_modules()`` spells it (from Dynamo's
    source path: see ``named_module_path`` for the exact spelling when the root module is known)."""
    path = _innermost(node)[1]
    path = _ROOT.sub("", path)
    path = _KEYED.sub(lambda m: "." + (m.group(1) or m.group(2)), path)
    path = _INDEX.sub(r".\1", path)
    return path.strip(".")


def module_key(node: fx.Node) -> str:
    return _innermost(node)[0]


def module_names_by_id(root: torch.nn.Module) -> dict[int, str]:
    """``id(module) -> name`` for every submodule of ``root`` (the exact ``named_modules()`` names)."""
    return {id(m): name for name, m in root.named_modules(remove_duplicate=False)}


def named_module_path(key: str, names_by_id: dict[int, str]) -> str | None:
    """The ``named_modules()`` name of the module Dynamo keyed ``key``: for modules Dynamo does not
    specialize the key is ``str(id(module))``, with ``@n`` on the n-th repeated call."""
    ident = key.partition("@")[0]
    return names_by_id.get(int(ident)) if ident.isdigit() else None


def unique_names(sites: list[AttentionSite]) -> None:
    """Give sites that share a module path (two attentions in one module) distinct names."""
    seen: dict[str, int] = {}
    for site in sites:
        base = site.name or "attention"
        n = seen.get(base, 0)
        seen[base] = n + 1
        site.name = base if n == 0 else f"{base}#{n}"
