"""Small helpers for reading Dynamo FX graphs the same way on torch 2.11 and 2.13."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx


def meta_val(node):
    """The fake value of a node: ``val`` after tracing, ``example_value`` in Dynamo's graphs."""
    if not isinstance(node, fx.Node):
        return None
    return node.meta.get("val", node.meta.get("example_value"))


_DUNDER = {
    f"__{name}__": getattr(operator, attr)
    for name, attr in [
        ("add", "add"),
        ("sub", "sub"),
        ("mul", "mul"),
        ("truediv", "truediv"),
        ("matmul", "matmul"),
        ("and", "and_"),
        ("or", "or_"),
        ("invert", "invert"),
        ("neg", "neg"),
        ("getitem", "getitem"),
        ("eq", "eq"),
        ("ne", "ne"),
        ("le", "le"),
        ("lt", "lt"),
        ("ge", "ge"),
        ("gt", "gt"),
    ]
}


def canonical_target(node: fx.Node):
    """One name per operation, whichever way Dynamo recorded it: ``x == y`` may be
    ``operator.eq`` or the method ``__eq__`` (torch 2.11); ``torch.Tensor.to`` becomes ``"to"``."""
    target = node.target
    if node.op == "call_method":
        return _DUNDER.get(target, target)
    if node.op == "call_function":
        owner = getattr(target, "__objclass__", None)
        if owner is torch.Tensor or owner is torch._C.TensorBase:
            name = target.__name__
            return _DUNDER.get(name, name)
    return target


# ``x[i] = y`` and ``x += y`` write into x.
_INPLACE_OPERATORS = {
    operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.imatmul,
}  # fmt: skip


def has_side_effect(node: fx.Node) -> bool:
    """The node writes to a tensor (an in-place op such as a KV cache's ``index_copy_``, a
    ``setitem``, a mutating op overload) or is impure by fx's own reckoning: never removed."""
    if node.is_impure():
        return True
    if node.op not in ("call_function", "call_method"):
        return False
    target = node.target
    if target in _INPLACE_OPERATORS:
        return True
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.is_mutable
    if getattr(target, "__module__", None) in ("_operator", "operator"):
        return False  # operator.and_ is "and", not an in-place op
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    # torch's naming convention: a trailing underscore (not a dunder) is the in-place variant.
    return name.endswith("_") and not name.endswith("__")


def eliminate_dead_code(gm: fx.GraphModule) -> int:
    """Remove nodes nothing reads, keeping every side effect (``Graph.eliminate_dead_code`` drops
    a method call such as ``cache.index_copy_(...)`` whose result is unused on torch 2.13).
    Returns how many nodes were removed."""
    removed = 0
    for node in reversed(list(gm.graph.nodes)):
        if node.op not in ("placeholder", "output") and not node.users and not has_side_effect(node):
            gm.graph.erase_node(node)
            removed += 1
    return removed
