"""Mask canonicalization: prove what a materialized attention mask computes, without running it.

Hugging Face models build a (B, 1, Nq, Nk) bool mask from aranges, positions and the 2-D padding
mask, even when no mask was passed. This pass interprets the subgraph that builds the mask over a
small abstract domain and, when every step is understood, returns the mask as structure:

    keep(b, i, j) = key_ok[b, j]                       (padding, optional)
                  & (k_pos[j] <= q_pos[i])              (causal, optional)
                  & (q_pos[i] - k_pos[j] < window)      (sliding window, optional)

with positions either plain indices plus an offset or a runtime tensor read at [b, i]. Anything
not understood yields a reason instead, and the caller keeps the mask exactly as it was.

Dimensions are counted from the right (-1 keys, -2 queries, -4 batch), as broadcasting aligns them.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field, replace

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int, statically_known_true

from .fxutil import canonical_target

_KEY_DIM, _QUERY_DIM, _BATCH_DIM = -1, -2, -4


@dataclass(frozen=True)
class Const:
    value: object


@dataclass(frozen=True)
class Leaf:
    """A runtime tensor the pass does not look into; it can only be read at [b, index]."""

    node: fx.Node


@dataclass(frozen=True)
class Indexed:
    """An integer tensor whose value at a broadcast position is ``source[b, idx] + offset``
    (``idx + offset`` when source is None), idx running along ``dim`` (length ``length``)."""

    dim: int
    rank: int
    length: object
    offset: int = 0
    source: fx.Node | None = None
    batch_dim: int | None = None


@dataclass(frozen=True)
class Bound:
    """``k - q <= limit`` (upper) or ``q - k <= limit`` (lower), k and q being position values
    (indices when the source is None, else the source read at [b, idx])."""

    upper: bool
    k_source: fx.Node | None
    q_source: fx.Node | None
    limit: object = field(compare=False)  # an int, or a SymInt (which does not hash) under dynamic shapes
    k_len: object = field(compare=False)  # lengths may be SymInts too
    q_len: object = field(compare=False)
    limit_key: str = ""  # the limit's text: what equality and hashing compare

    def __post_init__(self):
        object.__setattr__(self, "limit_key", str(self.limit))


@dataclass(frozen=True)
class KeyMask:
    source: fx.Node  # a (B, Nk) tensor, truthy = the key exists


@dataclass(frozen=True)
class Conj:
    atoms: frozenset


@dataclass(frozen=True)
class Unknown:
    reason: str


@dataclass
class MaskStructure:
    causal: bool = False
    window: int = 0
    key_ok: fx.Node | None = None
    q_source: fx.Node | None = None  # None: positions are indices
    q_offset: int = 0
    k_source: fx.Node | None = None
    # Query i sits at position Nk - Nq + i: the queries follow a KV cache whose length is only known
    # at run time (a decode step under dynamic shapes); q_offset is then 0.
    q_at_end: bool = False

    @property
    def positions_are_indices(self) -> bool:
        return self.q_source is None and self.k_source is None

    def describe(self) -> str:
        parts = ["causal" if self.causal else "bidirectional"]
        if self.window:
            parts.append(f"window {self.window}")
        if self.key_ok is not None:
            parts.append("key padding")
        if not self.positions_are_indices:
            parts.append("positions from a tensor")
        elif self.q_at_end:
            parts.append("queries after the KV cache")
        elif self.q_offset:
            parts.append(f"query offset {self.q_offset}")
        return " + ".join(parts)


TRUE = Conj(frozenset())


def _as_conj(value):
    if isinstance(value, Conj):
        return value
    if isinstance(value, Const) and isinstance(value.value, bool | int):
        return TRUE if value.value else None
    return None


def _shape(node):
    val = None
    if isinstance(node, fx.Node):
        val = node.meta.get("val", node.meta.get("example_value"))
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _same(a, b) -> bool:
    return statically_known_true(a == b)


def _may_equal(a, b) -> bool:
    """Equal, or sizes of different symbols that the graph does not relate (not provably unequal)."""
    return not statically_known_true(a != b)


class MaskInterpreter:
    """Abstract interpretation of the nodes that build a mask, memoised per graph."""

    def __init__(self):
        self.values: dict[fx.Node, object] = {}
        self._order: dict[fx.Node, int] = {}

    def value(self, arg):
        if isinstance(arg, fx.Node):
            if arg not in self.values:
                self._evaluate_slice(arg)
            return self.values[arg]
        if isinstance(arg, bool | int | float):
            return Const(arg)
        return Unknown(f"argument {arg!r}")

    def _evaluate_slice(self, node: fx.Node) -> None:
        """Evaluate the node's not-yet-known ancestors in graph order (no deep recursion)."""
        if node not in self._order:
            self._order = {n: i for i, n in enumerate(node.graph.nodes)}
        pending, stack = set(), [node]
        while stack:
            n = stack.pop()
            if n not in self.values and n not in pending:
                pending.add(n)
                stack.extend(n.all_input_nodes)
        for n in sorted(pending, key=self._order.__getitem__):
            self.values[n] = self._eval(n)

    def _eval(self, node: fx.Node):
        if node.op == "placeholder" and isinstance(meta := node.meta.get("example_value"), torch.SymInt):
            return Const(meta)  # a length under dynamic shapes (e.g. the KV cache's): a symbolic number
        if node.op not in ("call_function", "call_method"):
            return Leaf(node)
        target = canonical_target(node)
        name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
        handler = _HANDLERS.get(target) if not isinstance(target, str) else _METHODS.get(target)
        if handler is None:
            return Leaf(node)
        try:
            return handler(self, node)
        except _NotUnderstood as e:
            return Unknown(f"{name}: {e}")
        except Exception as e:  # a pass never breaks compilation: the mask stays as it was
            return Unknown(f"{name}: {type(e).__name__}: {e}")


class _NotUnderstood(Exception):
    pass


def _arg(node, i, key, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(key, default)


def _arange(interp, node):
    args = [a for a in node.args]
    if len(args) == 1:
        start, end = 0, args[0]
    elif len(args) >= 2:
        start, end = args[0], args[1]
        if len(args) > 2 and args[2] != 1:
            raise _NotUnderstood("step != 1")
    else:
        start, end = node.kwargs.get("start", 0), node.kwargs["end"]
    if node.kwargs.get("step", 1) != 1 or not isinstance(start, int):
        raise _NotUnderstood("start must be a constant and step 1")
    if isinstance(end, fx.Node):  # a symbolic length under dynamic shapes
        end = end.meta.get("val", end.meta.get("example_value"))
    if end is None:
        raise _NotUnderstood("unknown length")
    return Indexed(dim=-1, rank=1, length=end - start, offset=start)


def _constant_tensor(interp, node):
    data = _arg(node, 0, "data")
    if isinstance(data, bool | int | float):
        return Const(data)
    raise _NotUnderstood("non-scalar constant tensor")


def _scalar_ones(interp, node):
    size = _arg(node, 1 if node.op == "call_method" else 0, "size")
    if size in ((), [], None) or (isinstance(size, tuple | list) and all(s == 1 for s in size)):
        return Const(True if node.kwargs.get("dtype") == torch.bool else 1)
    raise _NotUnderstood("non-scalar ones")


def _is_integer(x) -> bool:
    return isinstance(x, int | torch.SymInt) and not isinstance(x, bool)


def _static_int(x) -> int | None:
    """``x`` as a plain int when it is one or a symbolic expression that simplified to a number."""
    if isinstance(x, int):
        return x
    return int(x) if is_concrete_int(x) else None


def _shift(interp, node, sign):
    a, b = interp.value(node.args[0]), interp.value(node.args[1])
    if isinstance(a, Const) and isinstance(b, Const):
        return Const(a.value + sign * b.value)
    if isinstance(a, Indexed) and isinstance(b, Const) and _is_integer(b.value):
        return replace(a, offset=a.offset + sign * b.value)
    if sign == 1 and isinstance(b, Indexed) and isinstance(a, Const) and _is_integer(a.value):
        return replace(b, offset=b.offset + a.value)
    raise _NotUnderstood("only index + constant is understood")


def _same_value(interp, node):
    """Ops that keep values: device/dtype moves (not to bool), expand, contiguous."""
    val = interp.value(node.args[0])
    if canonical_target(node) in ("to", "type"):
        dtype = node.kwargs.get("dtype") or next((a for a in node.args[1:] if isinstance(a, torch.dtype)), None)
        if dtype == torch.bool and not isinstance(val, Conj | Const | KeyMask):
            if isinstance(val, Leaf):
                return Leaf(node)  # a runtime tensor made bool: still a leaf (read as truthy)
            raise _NotUnderstood("integer values turned into bool")
    if isinstance(val, Indexed):
        shape = _shape(node)
        return replace(val, rank=len(shape)) if shape is not None else val
    if isinstance(val, Leaf):
        return Leaf(node)  # the moved / cast tensor is what the rewrite must read
    return val


def _reshape_like(interp, node):
    """view/reshape/unsqueeze that only add or drop size-1 dimensions keep values and right dims."""
    val = interp.value(node.args[0])
    src, dst = _shape(node.args[0]), _shape(node)
    if src is None or dst is None:
        raise _NotUnderstood("unknown shapes")
    if isinstance(val, Const | Conj | KeyMask | Leaf):
        if isinstance(val, Leaf):
            return Leaf(node)
        return val
    # Map the indexed dimension by matching non-1 sizes from the right.
    src_real = [(i - len(src), s) for i, s in enumerate(src) if not _same(s, 1)]
    dst_real = [(i - len(dst), s) for i, s in enumerate(dst) if not _same(s, 1)]
    if len(src_real) != len(dst_real) or not all(_same(a[1], b[1]) for a, b in zip(src_real, dst_real, strict=True)):
        raise _NotUnderstood("reshape that mixes dimensions")
    mapping = {a[0]: b[0] for a, b in zip(src_real, dst_real, strict=True)}
    if val.dim not in mapping:
        if _same(val.length, 1):
            return Const(val.offset) if val.source is None else Leaf(node)
        raise _NotUnderstood("indexed dimension lost")
    new_batch = mapping.get(val.batch_dim) if val.batch_dim is not None else None
    return replace(val, dim=mapping[val.dim], rank=len(dst), batch_dim=new_batch)


def _getitem(interp, node):
    base, index = node.args
    val = interp.value(base)
    if not isinstance(index, tuple):
        index = (index,)
    if any(isinstance(i, fx.Node) for i in index):
        return _gather(interp, node, val, index)
    if isinstance(val, Const | Conj):
        return val
    if not isinstance(val, Indexed):
        raise _NotUnderstood("basic indexing of a runtime tensor")
    # Basic indexing with None / full slices / a leading slice(start, stop) on the indexed dim.
    rank = val.rank
    expanded = []
    for i in index:
        if i is Ellipsis:
            expanded.extend([slice(None)] * (rank - sum(1 for j in index if j is not None and j is not Ellipsis)))
        else:
            expanded.append(i)
    expanded += [slice(None)] * (rank - sum(1 for j in expanded if j is not None))
    old_dim, new_pos, offset, new_dim = 0, 0, val.offset, None
    for i in expanded:
        if i is None:
            new_pos += 1
            continue
        if not isinstance(i, slice) or i.step not in (None, 1):
            raise _NotUnderstood(f"index {i!r}")
        if old_dim - rank == val.dim:
            start = i.start or 0
            if not isinstance(start, int) or start < 0:
                raise _NotUnderstood("slice start")
            offset += start
            if i.stop is not None and not (isinstance(i.stop, int) and i.stop >= 0):
                raise _NotUnderstood("slice stop")
            new_dim = new_pos
        elif i != slice(None):
            raise _NotUnderstood("slicing a broadcast dimension")
        old_dim += 1
        new_pos += 1
    new_rank, shape = new_pos, _shape(node)
    if new_dim is None or val.source is not None or shape is None:
        raise _NotUnderstood("indexing a gathered value")
    length = shape[new_dim]  # what the slice really kept (a stop past the end keeps less)
    return replace(val, dim=new_dim - new_rank, rank=new_rank, offset=offset, length=length)


def _gather(interp, node, val, index):
    """``t[(batch_idx, idx)]``: read a 2-D tensor at [b, idx] (HF's mask functions do this)."""
    idx_vals = [interp.value(i) for i in index]
    if len(index) != 2 or not all(isinstance(v, Indexed) and v.source is None for v in idx_vals):
        raise _NotUnderstood("advanced indexing other than t[batch_idx, idx]")
    b_idx, n_idx = idx_vals
    if b_idx.dim != _BATCH_DIM or b_idx.offset != 0 or n_idx.dim not in (_KEY_DIM, _QUERY_DIM):
        raise _NotUnderstood("indices are not (batch, query|key)")
    rank = max(b_idx.rank, n_idx.rank)
    if isinstance(val, Const | Conj):
        return val
    if isinstance(val, Indexed) and val.source is None and val.rank == 2:
        picked = n_idx if val.dim == -1 else b_idx
        return replace(picked, offset=picked.offset + val.offset, rank=rank)
    if isinstance(val, Leaf):
        shape = _shape(val.node)
        # Under dynamic shapes the padding mask and the keys have lengths of their own symbols: its
        # first N columns are read (the rewrite reads the same prefix; a shorter mask fails there too).
        if shape is None or len(shape) != 2 or n_idx.offset != 0 or not _may_equal(shape[1], n_idx.length):
            raise _NotUnderstood("reading a tensor that is not (B, N) at [b, 0..N)")
        return Indexed(dim=n_idx.dim, rank=rank, length=n_idx.length, source=val.node, batch_dim=_BATCH_DIM)
    raise _NotUnderstood("advanced indexing of an unsupported value")


def _flip(op):
    return {
        operator.le: operator.ge,
        operator.lt: operator.gt,
        operator.ge: operator.le,
        operator.gt: operator.lt,
        operator.eq: operator.eq,
        operator.ne: operator.ne,
    }[op]


_COMPARE = {
    operator.le: operator.le,
    operator.lt: operator.lt,
    operator.ge: operator.ge,
    operator.gt: operator.gt,
    operator.eq: operator.eq,
    operator.ne: operator.ne,
    torch.le: operator.le,
    torch.lt: operator.lt,
    torch.ge: operator.ge,
    torch.gt: operator.gt,
    torch.eq: operator.eq,
    torch.ne: operator.ne,
    "le": operator.le,
    "lt": operator.lt,
    "ge": operator.ge,
    "gt": operator.gt,
    "eq": operator.eq,
    "ne": operator.ne,
}


def _compare(interp, node):
    op = _COMPARE[canonical_target(node)]
    a, b = interp.value(node.args[0]), interp.value(node.args[1])
    if isinstance(a, Const) and isinstance(b, Const):
        return Const(bool(op(a.value, b.value)))
    if isinstance(a, Const):
        a, b, op = b, a, _flip(op)
    if isinstance(a, Indexed) and isinstance(b, Const):
        return _compare_with_constant(a, op, b.value)
    if not (isinstance(a, Indexed) and isinstance(b, Indexed)):
        raise _NotUnderstood("comparison of values that are not positions")
    if {a.dim, b.dim} != {_KEY_DIM, _QUERY_DIM} or op in (operator.eq, operator.ne):
        raise _NotUnderstood("comparison that is not key-vs-query positions")
    if a.dim == _QUERY_DIM:
        a, b, op = b, a, _flip(op)
    # (k_val + a.off) op (q_val + b.off)  <=>  k_val - q_val op (b.off - a.off)
    c = b.offset - a.offset
    if op in (operator.le, operator.lt):
        limit, upper = (c if op is operator.le else c - 1), True
    else:  # k - q >= c  <=>  q - k <= -c
        limit, upper = (-c if op is operator.ge else -c - 1), False
    return Conj(frozenset([Bound(upper, a.source, b.source, limit, a.length, b.length)]))


def _compare_with_constant(a: Indexed, op, c):
    """``idx + off op c`` is provable when it holds for every index 0..length-1."""
    if a.source is not None:
        raise _NotUnderstood("comparing a gathered value with a constant")
    lo, hi = a.offset, a.length - 1 + a.offset
    if isinstance(hi, torch.SymInt):
        hi = None
    if op in (operator.ge, operator.gt) and op(lo, c):
        return TRUE
    if op in (operator.le, operator.lt) and hi is not None and op(hi, c):
        return TRUE
    raise _NotUnderstood("comparison with a constant that is not always true")


def _is_key_read(v) -> bool:
    return isinstance(v, Indexed) and v.source is not None and v.dim == _KEY_DIM


def _key_mask(v: Indexed) -> Conj:
    """A bool tensor read at [b, key] is a padding mask ("&" on integers would be bitwise)."""
    src = v.source.meta.get("val", v.source.meta.get("example_value"))
    if src is None or src.dtype != torch.bool:
        raise _NotUnderstood("a key mask that is not bool")
    return Conj(frozenset([KeyMask(v.source)]))


def _logical_and(interp, node):
    vals = [interp.value(a) for a in node.args[:2]]
    conjs = []
    for v in vals:
        if _is_key_read(v):
            conjs.append(_key_mask(v))
            continue
        c = _as_conj(v)
        if c is None:
            if isinstance(v, Const):
                return Const(False)
            raise _NotUnderstood("and-ing a value that is not a mask")
        conjs.append(c)
    return Conj(conjs[0].atoms | conjs[1].atoms)


def _diff(interp, node):
    """torch.diff over an index with ``prepend=first - 1`` is all ones (HF's packed-sequence check)."""
    x = interp.value(node.args[0])
    prepend = interp.value(node.kwargs.get("prepend")) if node.kwargs.get("prepend") is not None else None
    dim = node.kwargs.get("dim", -1)
    if (
        isinstance(x, Indexed)
        and x.source is None
        and isinstance(prepend, Indexed)
        and prepend.source is None
        and dim in (-1, x.rank - 1)
        and x.dim == -1
        and prepend.dim == -1
        and prepend.offset == x.offset - 1
        and _same(prepend.length, 1)
        and node.kwargs.get("append") is None
    ):
        return Const(1)
    raise _NotUnderstood("diff of values that are not an index")


def _cumsum(interp, node):
    x = interp.value(node.args[0])
    if isinstance(x, Const) and x.value in (0, False):
        return Const(0)
    raise _NotUnderstood("cumsum of non-zero values")


_HANDLERS = {
    torch.arange: _arange,
    torch.tensor: _constant_tensor,
    torch.scalar_tensor: _constant_tensor,
    operator.add: lambda i, n: _shift(i, n, 1),
    operator.sub: lambda i, n: _shift(i, n, -1),
    torch.add: lambda i, n: _shift(i, n, 1),
    torch.sub: lambda i, n: _shift(i, n, -1),
    operator.getitem: _getitem,
    operator.and_: _logical_and,
    torch.logical_and: _logical_and,
    torch.bitwise_and: _logical_and,
    torch.diff: _diff,
    torch.cumsum: _cumsum,
    torch.unsqueeze: _reshape_like,
    torch.reshape: _reshape_like,
    torch.ones: _scalar_ones,
    **{k: _compare for k in _COMPARE if not isinstance(k, str)},
}
_METHODS = {
    "to": _same_value,
    "type": _same_value,
    "expand": _same_value,
    "expand_as": _same_value,
    "contiguous": _same_value,
    "long": _same_value,
    "int": _same_value,
    "float": _same_value,
    "view": _reshape_like,
    "reshape": _reshape_like,
    "unsqueeze": _reshape_like,
    "new_ones": _scalar_ones,
    "cumsum": _cumsum,
    "diff": _diff,
    "__and__": _logical_and,
    "logical_and": _logical_and,
    "bitwise_and": _logical_and,
    "add": lambda i, n: _shift(i, n, 1),
    "sub": lambda i, n: _shift(i, n, -1),
    **{k: _compare for k in _COMPARE if isinstance(k, str)},
}


def structure_from_value(value, n_q, n_k) -> MaskStructure | str:
    """Turn the abstract value of a bool mask into structure, or a reason it cannot be."""
    if isinstance(value, Unknown):
        return f"mask not understood ({value.reason})"
    if isinstance(value, Leaf):
        return "mask is run-time data; its values cannot be proven to be a structure"
    if _is_key_read(value):
        try:
            value = _key_mask(value)
        except _NotUnderstood as e:
            return f"mask not understood ({e})"
    conj = _as_conj(value)
    if conj is None:
        return "mask is not a conjunction of causal / window / padding conditions"
    s = MaskStructure()
    bounds = [a for a in conj.atoms if isinstance(a, Bound)]
    uppers = [a for a in bounds if a.upper]
    lowers = [a for a in bounds if not a.upper]
    keys = [a.source for a in conj.atoms if isinstance(a, KeyMask)]
    if len(set(keys)) > 1:
        return "several key masks"
    sources = {(a.k_source, a.q_source) for a in bounds}
    if len(sources) > 1:
        return "conditions read positions from different tensors"
    if not all(_same(a.k_len, n_k) and _same(a.q_len, n_q) for a in bounds):
        return "mask indices do not span the query / key lengths"
    if sources:
        s.k_source, s.q_source = next(iter(sources))
    for src, n in ((s.k_source, n_k), (s.q_source, n_q)):
        if src is not None and (_shape(src) is None or not _same(_shape(src)[-1], n)):
            return "position tensor does not match the sequence length"
    q_offset = 0
    if uppers:
        if len(uppers) > 1 and not all(_static_int(a.limit) is not None for a in uppers):
            return "several causal conditions with symbolic offsets"
        s.causal, q_offset = True, min(a.limit for a in uppers)
    if lowers:
        # q - k <= low, with q' = q + q_offset:  q' - k <= low + q_offset  <=>  q' - k < W
        if len(lowers) > 1 and not all(_static_int(a.limit) is not None for a in lowers):
            return "several window conditions with symbolic offsets"
        s.window = _static_int(min(a.limit for a in lowers) + q_offset + 1)
        if s.window is None:
            return "the window's width is not a constant"
        if s.window <= 0:
            return "window keeps no key"
    if (offset := _static_int(q_offset)) is not None:
        s.q_offset = offset
    elif s.q_source is None and s.k_source is None and _same(q_offset, n_k - n_q):
        s.q_at_end = True  # a decode step: the queries are the last Nq of Nk positions
    else:
        return "the query offset is symbolic and not the KV cache's length"
    s.key_ok = keys[0] if keys else None
    return s


def canonicalize_mask(interp: MaskInterpreter, mask: fx.Node, n_q, n_k) -> MaskStructure | str:
    """Structure of a bool mask node (True = keep), or the reason it stays as it is."""
    shape = _shape(mask)
    if shape is None:
        return "mask has no shape information"
    if len(shape) == 4 and not _same(shape[1], 1):
        return "mask differs per head"
    return structure_from_value(interp.value(mask), n_q, n_k)
