"""Finding attention sites in a Dynamo FX graph.

The forms are declared as data: ``SITE_RULES`` names each matcher with the models that need it,
and ``SCORE_STEPS`` / ``PROB_STEPS`` list the steps a hand-written attention may take between its
two matmuls. Matchers return None when a node is not theirs; they never raise.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from .fxutil import canonical_target, meta_val
from .site import AttentionSite, module_key, module_path, named_module_path, unique_names

_SDPA = {
    F.scaled_dot_product_attention,
    torch._C._nn.scaled_dot_product_attention,
    torch.ops.aten.scaled_dot_product_attention.default,
}
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_MASK_FLOOR = -1e30  # an additive value at or below this removes the key (HF uses finfo.min)


def is_call(node, *targets) -> bool:
    """node calls one of targets (functions, or method names as strings)."""
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
        return False
    return canonical_target(node) in targets


_val = meta_val


def _number(x) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


# ---------------------------------------------------------------------------------------------
# GQA: K/V repeated to the query heads (HF's repeat_kv) are folded back to the real KV heads.


def fold_kv_repeat(node: fx.Node) -> tuple[fx.Node, int] | None:
    """``reshape(expand(x[:, :, None]), B, H*g, N, D)`` or ``repeat_interleave(x, g, 1)`` → (x, g)."""
    if is_call(node, "reshape", "view", torch.reshape):
        expanded = node.args[0]
        if not is_call(expanded, "expand"):
            return None
        inserted = expanded.args[0]
        if is_call(inserted, operator.getitem):
            idx = inserted.args[1]
            if not (
                isinstance(idx, tuple)
                and len(idx) == 5
                and idx[2] is None
                and all(i == slice(None) for j, i in enumerate(idx) if j != 2)
            ):
                return None
        elif not (is_call(inserted, "unsqueeze", torch.unsqueeze) and inserted.args[1] in (2, -3)):
            return None
        base = inserted.args[0]
    elif is_call(node, "repeat_interleave", torch.repeat_interleave):
        base = node.args[0]
        dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else None)
        if dim not in (1, -3) or not isinstance(node.args[1], int):
            return None
    else:
        return None
    b, out = _val(base), _val(node)
    if b is None or out is None or b.dim() != 4 or out.dim() != 4:
        return None
    if not (b.shape[0] == out.shape[0] and b.shape[2:] == out.shape[2:]):
        return None
    groups = out.shape[1] // b.shape[1]
    if groups * b.shape[1] != out.shape[1]:
        return None
    if groups == 1:
        return None
    return base, int(groups)


def _constant(x) -> float | None:
    """A number, or a node that makes a constant: ``torch.tensor(0.0)``, ``torch.zeros(())``..."""
    if (n := _number(x)) is not None:
        return n
    if is_call(x, torch.tensor, torch.scalar_tensor):
        return _number(x.args[0] if x.args else x.kwargs.get("data"))
    if is_call(x, torch.zeros, torch.zeros_like, "new_zeros", "zero_"):
        return 0.0
    if is_call(x, torch.full):
        return _number(x.args[1] if len(x.args) > 1 else x.kwargs.get("fill_value"))
    return None


def _bool_from_additive(mask: fx.Node) -> fx.Node | None:
    """``where(keep, 0, -big)``: an additive mask that only removes keys → its bool ``keep``."""
    if is_call(mask, torch.where) and len(mask.args) == 3:
        keep, zero, neg = mask.args
        neg_v = _constant(neg)
        if _constant(zero) == 0.0 and neg_v is not None and neg_v <= _MASK_FLOOR:
            val = _val(keep)
            if val is not None and val.dtype == torch.bool:
                return keep
    return None


# ---------------------------------------------------------------------------------------------
# F.scaled_dot_product_attention


def _float_argument(arg) -> float | None:
    """An SDPA float argument's value. Under dynamic shapes Dynamo passes module float attributes (HF's
    ``scaling``, ``attention_dropout``) as symbolic floats: read them (a guard on the value, which
    is fixed per model). NaN where nothing is known: the site then keeps its attention."""
    if arg is None or not isinstance(arg, fx.Node):
        return None if arg is None else float(arg)
    value = _val(arg)
    if isinstance(value, (torch.SymFloat, torch.SymInt, float, int)):
        return float(value)
    return math.nan


def match_sdpa(node: fx.Node) -> AttentionSite | None:
    if not is_call(node, *_SDPA):
        return None
    args = dict(zip(_SDPA_ARGS, node.args, strict=False))
    args.update(node.kwargs)
    q, k, v = args["query"], args["key"], args["value"]
    if _val(q) is None or _val(q).dim() != 4:
        return None
    site = AttentionSite(
        name=module_path(node),
        module_key=module_key(node),
        form="sdpa",
        output=node,
        q=q,
        k=k,
        v=v,
        scale=_float_argument(args.get("scale")),
        causal=bool(args.get("is_causal", False)),
        dropout_p=_float_argument(args.get("dropout_p")) or 0.0,
    )
    if args.get("enable_gqa"):
        site.kv_groups = _val(q).shape[1] // _val(k).shape[1]
    mask = args.get("attn_mask")
    if mask is not None:
        if _val(mask) is not None and _val(mask).dtype == torch.bool:
            site.mask = mask
        else:
            site.mask = _bool_from_additive(mask)
            if site.mask is None:
                site.mask, site.mask_is_additive = mask, True
    return site


_CACHE_GROUP = "sparsecomp::cache_group_attention"


def match_cache_group(node: fx.Node) -> AttentionSite | None:
    """A group of a layer's heads over the keys a per-head cache keeps for them
    (``sparsecomp.runtime.head_groups``): reported, and kept as it is."""
    name = getattr(node.target, "name", None)
    if node.op != "call_function" or not callable(name) or name() != _CACHE_GROUP:
        return None
    q, k, v, mask, scale, keeps = node.args
    site = AttentionSite(
        name=module_path(node), module_key=module_key(node), form="cache_group", output=node, q=q, k=k, v=v,
        scale=scale, mask=mask,
        fallback=f"heads of a per-head cache layer, over the keys it keeps for them ({keeps}): the attention as it is",
    )  # fmt: skip
    if _val(q) is not None and _val(k) is not None:
        site.kv_groups = _val(q).shape[1] // _val(k).shape[1]
    return site


# ---------------------------------------------------------------------------------------------
# Hand-written attention: matmul → scale → softcap → mask → softmax → cast/dropout → matmul


@dataclass
class _Walk:
    """What the score steps found, walking from the softmax input back to q @ k^T."""

    scale: float = 1.0
    softcap: float = 0.0
    mask: fx.Node | None = None
    mask_is_additive: bool = False


def _single_user(node) -> bool:
    return len(node.users) == 1


def _step_mask_add(node, walk):
    """HF eager (GPT-2, BERT, Llama eager): scores + float mask."""
    if is_call(node, operator.add, torch.add, "add") and walk.mask is None and len(node.args) == 2:
        for scores, mask in (node.args, node.args[::-1]):
            if isinstance(mask, fx.Node) and _val(mask) is not None and _val(mask).dim() >= 2:
                keep = _bool_from_additive(mask)
                walk.mask, walk.mask_is_additive = (keep, False) if keep is not None else (mask, True)
                return scores
    return None


def _step_mask_where(node, walk):
    """GPT-2 (legacy): where(causal, scores, finfo.min)."""
    if is_call(node, torch.where) and walk.mask is None and len(node.args) == 3:
        keep, scores, neg = node.args
        if (c := _constant(neg)) is not None and c <= _MASK_FLOOR:
            walk.mask = keep
            return scores
    return None


def _step_masked_fill(node, walk):
    """Older BERT/OPT ports: scores.masked_fill(~keep, -inf)."""
    if is_call(node, "masked_fill", torch.masked_fill) and walk.mask is None:
        scores, drop, neg = node.args[:3]
        if (
            _constant(neg) is not None
            and _constant(neg) <= _MASK_FLOOR
            and is_call(drop, operator.invert, torch.logical_not, "logical_not", "__invert__")
        ):
            walk.mask = drop.args[0]
            return scores
    return None


def _step_softcap(node, walk):
    """Gemma 2: tanh(scores / c) * c."""
    if is_call(node, operator.mul, torch.mul) and walk.softcap == 0.0 and walk.scale == 1.0:
        t, c = node.args
        if is_call(t, torch.tanh, "tanh") and _number(c) and _single_user(t):
            inner = t.args[0]
            if is_call(inner, operator.truediv, torch.div) and _number(inner.args[1]) == _number(c):
                walk.softcap = _number(c)
                return inner.args[0] if _single_user(inner) else None
    return None


def _step_scale(node, walk):
    """GPT-2/BERT/Llama eager: scores * scale, or scores / sqrt(d)."""
    if walk.scale != 1.0:
        return None
    if is_call(node, operator.mul, torch.mul, "mul"):
        a, b = node.args
        for scores, c in ((a, b), (b, a)):
            if isinstance(scores, fx.Node) and _number(c) is not None:
                walk.scale = _number(c)
                return scores
    if is_call(node, operator.truediv, torch.div, "div") and _number(node.args[1]):
        walk.scale = 1.0 / _number(node.args[1])
        return node.args[0]
    return None


# Order matters: walking back from softmax, the mask comes last, the scale first.
SCORE_STEPS: list[Callable] = [
    _step_mask_add,
    _step_mask_where,
    _step_masked_fill,
    _step_softcap,
    _step_scale,
]


def _is_key_transpose(node) -> fx.Node | None:
    if is_call(node, "transpose", torch.transpose) and sorted(d % 4 for d in node.args[1:3]) == [2, 3]:
        return node.args[0]
    if is_call(node, "permute", torch.permute):
        dims = node.args[1] if isinstance(node.args[1], tuple | list) else node.args[1:]
        if tuple(d % 4 for d in dims) == (0, 1, 3, 2):
            return node.args[0]
    if node.op == "call_function" and node.target is getattr and node.args[1] == "mT":
        return node.args[0]
    return None


_MATMUL = (torch.matmul, operator.matmul, "matmul", "__matmul__")
_CASTS = ("to", "type", "float", "half", "bfloat16", "type_as")


def _prob_step(node) -> bool:
    """Steps allowed between softmax and the second matmul: dtype casts and dropout(p=0)."""
    if is_call(node, *_CASTS):
        return True
    if is_call(node, F.dropout, torch.dropout):
        p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
        training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
        return p == 0.0 or training is False
    return False


def match_handwritten(node: fx.Node) -> AttentionSite | None:
    """Start from a softmax over the last dim; walk down to P @ V and up to Q @ K^T."""
    if not is_call(node, F.softmax, torch.softmax, "softmax"):
        return None
    val = _val(node)
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    if val is None or val.dim() != 4 or dim not in (-1, 3):
        return None
    probs = node
    while _single_user(probs) and _prob_step(next(iter(probs.users))):
        probs = next(iter(probs.users))
    if not _single_user(probs):
        return None
    out = next(iter(probs.users))
    if not (is_call(out, *_MATMUL) and out.args[0] is probs):
        return None
    walk, scores = _Walk(), node.args[0]
    while not is_call(scores, *_MATMUL):
        if not _single_user(scores):
            return None
        for step in SCORE_STEPS:
            prev = step(scores, walk)
            if prev is not None:
                scores = prev
                break
        else:
            return None
    if not _single_user(scores):
        return None
    q, kt = scores.args
    k = _is_key_transpose(kt)
    if k is None or _val(q) is None or _val(q).dim() != 4:
        return None
    site = AttentionSite(
        name=module_path(node),
        module_key=module_key(node),
        form="matmul_softmax_matmul",
        output=out,
        q=q,
        k=k,
        v=out.args[1],
        scale=walk.scale,
        softcap=walk.softcap,
        mask=walk.mask,
        mask_is_additive=walk.mask_is_additive,
    )
    return site


@dataclass(frozen=True)
class SiteRule:
    name: str
    matcher: Callable[[fx.Node], AttentionSite | None]
    needed_by: str


SITE_RULES = [
    # Llama, Mistral, Qwen2/3, GPT-2, BERT with attn_implementation="sdpa"; T5 (float bias masks)
    SiteRule("sdpa", match_sdpa, "HF sdpa attention (Llama, Mistral, Qwen, GPT-2, BERT, T5)"),
    # GPT-2, BERT, Gemma 2 (softcap) with attn_implementation="eager"
    SiteRule("matmul_softmax_matmul", match_handwritten, "HF eager attention (GPT-2, BERT, Gemma 2)"),
    # sparsecomp.PlanKVCache's layers of head groups (DuoAttention's retrieval and streaming heads)
    SiteRule("cache_group", match_cache_group, "per-head cache layers (sparsecomp.PlanKVCache)"),
]


def find_sites(gm: fx.GraphModule, names_by_id: dict[int, str] | None = None) -> list[AttentionSite]:
    """Every attention in the graph, in graph order, GQA repeats folded, with unique names.
    ``names_by_id`` (``site.module_names_by_id(model)``) gives the exact ``named_modules()`` names;
    without it they are read from Dynamo's source paths."""
    sites = []
    for node in gm.graph.nodes:
        for rule in SITE_RULES:
            site = rule.matcher(node)
            if site is not None:
                _fold_gqa(site)
                if names_by_id and (exact := named_module_path(site.module_key, names_by_id)) is not None:
                    site.name = exact
                sites.append(site)
                break
    unique_names(sites)
    return sites


def _fold_gqa(site: AttentionSite) -> None:
    fk, fv = fold_kv_repeat(site.k), fold_kv_repeat(site.v)
    if fk and fv and fk[1] == fv[1]:
        site.k, site.v, site.kv_groups, site.gqa_folded = fk[0], fv[0], fk[1], True


def default_scale(site: AttentionSite) -> float:
    return site.scale if site.scale is not None else 1.0 / math.sqrt(site.shape["head_dim"])
