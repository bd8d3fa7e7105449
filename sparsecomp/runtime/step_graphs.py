"""Decode steps of a static KV cache replayed as CUDA graphs.

One decode step launches the same few hundred kernels on the same memory every time (the cache, the
decode state beside it and the weights never move), so at batch 1 the GPU waits on the host's
launches, not on bytes. A CUDA graph records the step once and replays it with one launch.
Inductor's own graphs (``mode="reduce-overhead"``) crash while capturing on torch 2.11 (in its
static launcher), so this records the compiled forward itself, as a whole step.

A call is graphed when it is a one-token step (``input_ids`` or ``inputs_embeds`` with one position
per row) of a CUDA model whose cache is a static one that advances by tensor ops alone
(transformers' StaticLayer, or sparsecomp's ring, evicting, head-group and host layers: no host
counter, which a replay would skip). Anything else runs the forward as it is. Per signature
(shapes, dtypes and non-tensor arguments of the call, the cache's memory): the first call runs as
it is (it compiles); the second is captured and replayed; later ones copy their tensors into the
captured inputs and replay. Steps under grad mode run as they are (a graph records no autograd). A
graph replays the memory it was captured on: after the weights move (a parameter replaced,
``model.to(...)``), ``reset()``.

transformers' ``generate`` lengthens the 2D ``attention_mask`` by one column a step; a graph needs
one shape, so the mask is padded with zeros to the cache's length first. That is what transformers
does itself when it builds the 4D mask (``prepare_padding_mask``), so the mask the model sees is the
same.
"""

from __future__ import annotations

import functools
import warnings
import weakref

import torch
import torch.nn.functional as F


def _graphable_layer_types() -> tuple[type, ...]:
    from transformers.cache_utils import StaticLayer

    from .evicting_cache import EvictingLayer
    from .head_groups import HeadGroupsLayer
    from .host_cache import HostStaticLayer
    from .streaming_cache import StreamingRingLayer

    return StaticLayer, HostStaticLayer, StreamingRingLayer, EvictingLayer, HeadGroupsLayer


def graphable_cache(cache) -> bool:
    """Whether a decode step over ``cache`` only reads and writes device memory in place: every
    layer (and group of heads) one of the static layer types (exact type: a subclass may keep host
    state), allocated."""
    layers = getattr(cache, "layers", None)
    if not layers or getattr(cache, "offloading", False):
        return False
    types = _graphable_layer_types()

    def graphable(layer) -> bool:
        parts = getattr(layer, "sublayers", [])
        return type(layer) in types and getattr(layer, "is_initialized", False) and all(map(graphable, parts))

    return all(map(graphable, layers))


def _layer_memory(layer) -> tuple:
    """The addresses a step reads and writes in one layer: its K/V, counter and state (an
    evicting layer's ranks), or its head groups'."""
    own = (layer.cumulative_length.data_ptr(),)
    if hasattr(layer, "sublayers"):
        return own + tuple(_layer_memory(part) for part in layer.sublayers)
    state = tuple(t.data_ptr() for t in getattr(layer, "state_tensors", tuple)())
    return (layer.keys.data_ptr(), layer.values.data_ptr(), *own, *state)


def _cache_memory(cache) -> tuple:
    """The addresses a captured step reads and writes in the cache: a graph is replayed only over
    the very memory it was captured on."""
    return tuple(_layer_memory(layer) for layer in cache.layers)


def _new_tokens(kwargs) -> int | None:
    for name in ("input_ids", "inputs_embeds"):
        t = kwargs.get(name)
        if isinstance(t, torch.Tensor):
            return t.shape[1] if t.dim() >= 2 else None
    return None


class CudaStepGraph:
    """One captured step: torch's CUDA graph."""

    device_type = "cuda"

    def __init__(self):
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, step):
        torch.cuda.synchronize()
        with torch.cuda.graph(self.graph):
            return step()

    def replay(self) -> None:
        self.graph.replay()

    @staticmethod
    def abandon() -> None:
        torch.cuda.synchronize()


class DecodeStepGraphs:
    """``forward`` (a compiled model's forward, called with keyword arguments) whose one-token
    static-cache steps replay CUDA graphs. ``captured`` counts graphs recorded, ``replayed`` steps
    run from them; ``reasons`` says why a signature runs without one."""

    def __init__(self, forward, graph_type=CudaStepGraph, label: str = "forward"):
        self.forward = forward
        self.label = label  # which calls it wraps, for the report
        self.graph_type = graph_type  # tests replace it (CPU)
        # generate reads the forward's signature to choose what it passes (position_ids...): keep it
        functools.update_wrapper(self, forward, updated=())  # names and __wrapped__, not its __dict__
        self.graphs: dict[tuple, tuple] = {}  # signature -> (graph, static input tensors, static output)
        self.seen: set[tuple] = set()  # signatures run once (compiled), not captured yet
        self.reasons: dict[tuple, str] = {}  # signatures that could not be captured, and why
        self.captured = 0
        self.replayed = 0

    def __call__(self, *args, **kwargs):
        cache = kwargs.get("past_key_values", kwargs.get("cache"))  # later transformers name it cache
        if args or cache is None or _new_tokens(kwargs) != 1 or not graphable_cache(cache) or torch.is_grad_enabled():
            return self.forward(*args, **kwargs)  # a graph records no autograd: steps under grad run as they are
        device = self.graph_type.device_type
        if not any(isinstance(t, torch.Tensor) and t.device.type == device for t in kwargs.values()):
            return self.forward(**kwargs)
        kwargs = self._padded_mask(kwargs, cache)
        key = self._signature(kwargs, cache)
        if key is None or key in self.reasons:
            return self.forward(**kwargs)
        if key in self.graphs:
            return self._replay(key, kwargs, cache)
        if key not in self.seen:  # the first step of a signature compiles: never inside a capture
            self.seen.add(key)
            weakref.finalize(cache, self._forget, id(cache))
            return self.forward(**kwargs)
        return self._capture(key, kwargs, cache)

    def reset(self) -> None:
        """Drop every graph: they replay the memory they were captured on, so after the model's
        weights move (a parameter replaced rather than updated in place, ``model.to(...)``) call this."""
        self.graphs.clear()
        self.seen.clear()
        self.reasons.clear()

    def _forget(self, cache_id: int) -> None:
        """A cache is gone: its graphs go too (their memory pools with them)."""
        for table in (self.graphs, self.reasons):
            for key in [k for k in table if _cache_id(k) == cache_id]:
                del table[key]
        self.seen = {k for k in self.seen if _cache_id(k) != cache_id}

    @staticmethod
    def _padded_mask(kwargs: dict, cache) -> dict:
        mask = kwargs.get("attention_mask")
        length = max(layer.max_cache_len for layer in cache.layers)
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] < length:
            kwargs = {**kwargs, "attention_mask": F.pad(mask, (0, length - mask.shape[1]))}
        return kwargs

    @staticmethod
    def _signature(kwargs: dict, cache) -> tuple | None:
        parts = [("cache", id(cache), _cache_memory(cache))]  # first: _cache_id reads it
        for name in sorted(kwargs):
            value = kwargs[name]
            if value is cache:
                parts.append((name, "cache"))
            elif isinstance(value, torch.Tensor):
                parts.append((name, tuple(value.shape), value.stride(), value.dtype, value.device))
            else:
                try:
                    hash(value)
                except TypeError:
                    return None  # an argument the signature cannot hold: run as it is
                parts.append((name, value))
        return tuple(parts)

    def _capture(self, key: tuple, kwargs: dict, cache):
        static = {n: v.clone() if isinstance(v, torch.Tensor) else v for n, v in kwargs.items()}
        graph = self.graph_type()
        try:
            out = graph.capture(lambda: self.forward(**static))
        except Exception as error:  # noqa: BLE001 - any capture failure runs the step as it is
            self.reasons[key] = f"capture failed: {type(error).__name__}: {error}"
            warnings.warn(f"sparsecomp: decode step runs without a CUDA graph ({self.reasons[key]})", stacklevel=3)
            graph.abandon()
            return self.forward(**kwargs)
        # only the tensors stay (the cache, in the kwargs and in the output, is the caller's: a graph
        # must not keep it alive)
        inputs = {n: v for n, v in static.items() if isinstance(v, torch.Tensor)}
        self.graphs[key] = (graph, inputs, _swapped(out, cache, _CACHE))
        self.captured += 1
        graph.replay()  # capture records, it does not run: this step runs now
        return _detached(out)

    def _replay(self, key: tuple, kwargs: dict, cache):
        graph, inputs, out = self.graphs[key]
        for name, tensor in inputs.items():
            tensor.copy_(kwargs[name])
        graph.replay()
        self.replayed += 1
        return _detached(out, cache)

    def summary(self) -> str:
        """One line for the inspect report."""
        line = f"{self.label}: decode steps as CUDA graphs: {self.captured} captured, {self.replayed} steps replayed"
        reasons = sorted(set(self.reasons.values()))
        return line + (f"; not graphed: {'; '.join(reasons)}" if reasons else "")


def _cache_id(key: tuple) -> int:
    return key[0][1]


_CACHE = object()  # where a stored output held the step's cache


def _is_model_output(out) -> bool:
    return hasattr(out, "keys") and hasattr(out, "__setitem__")


def _swapped(out, old, new):
    """``out`` (a tuple or a transformers ModelOutput, its tensors shared) with ``new`` wherever it
    held ``old``: the stored output of a graph holds a marker where the caller's cache goes."""
    if isinstance(out, (tuple, list)):
        return type(out)(new if v is old else v for v in out)
    if _is_model_output(out):
        copy = type(out)(**out)
        for name, value in out.items():
            if value is old:
                copy[name] = new
        return copy
    return out


def _detached(out, cache=None):
    """The step's output with its tensors (logits, hidden states) copied, as the graph's own output
    memory is rewritten by the next replay, and ``cache`` where a stored output holds the marker."""
    if isinstance(out, torch.Tensor):
        return out.clone()
    if out is _CACHE:
        return cache
    if isinstance(out, (tuple, list)):
        return type(out)(_detached(v, cache) for v in out)
    if _is_model_output(out):
        copy = type(out)(**out)
        for name, value in out.items():
            if isinstance(value, (torch.Tensor, tuple)) or value is _CACHE:
                copy[name] = _detached(value, cache)
        return copy
    return out
