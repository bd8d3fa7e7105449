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
