"""A static KV cache whose keys and values live in host memory and are read by the GPU in place:
the storage of Double Sparsity-Offload.

Double Sparsity-Offload keeps the full K/V of a sequence on the host and only the label cache (the
calibrated channels of K) on the GPU; each decode step scores the labels on the GPU, takes the top-k
tokens and reads only their K/V rows. Page-locked host memory is addressable from the GPU (unified
virtual addressing), so the cache tensors here are CUDA tensors whose storage is host memory: the
decode kernel gathers the selected rows across the bus itself. No staging buffer, no copy stream,
no host sync (a decode step stays CUDA-graph capturable), and the graphs sparsecomp compiles are
the same as for a GPU cache. A head whose rule is dense reads its whole cache across the bus each
step, slower than copying it whole (on the H200 at 256K keys, 8 layers: 0.68 s per step against
0.22 s for transformers' offloading cache). The label cache and Quest's page bounds are allocated
on the site's device, the GPU.

A multi-token update (the prompt) returns a GPU copy of the layer's cache for that forward only:
prefill attention reads every key many times, which must not cross the bus each time.

On a CPU model the cache is an ordinary static cache (host memory is the model's memory). Needs
transformers (the ``hf`` extra).
"""

from __future__ import annotations

import torch
from transformers import StaticCache
from transformers.cache_utils import StaticLayer

# bytes per element -> an integer type of that size (the array interface knows no bfloat16)
_INTEGER = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_TYPESTR = {1: "|u1", 2: "<i2", 4: "<i4", 8: "<i8"}


class _HostMemoryView:
    """The CUDA array interface of a page-locked host tensor; the GPU tensor made from it keeps
    this object, and so the host tensor, alive."""

    def __init__(self, host: torch.Tensor):
        self.host = host
        self.__cuda_array_interface__ = {
            "shape": tuple(host.shape),
            "typestr": _TYPESTR[host.element_size()],
            "data": (host.data_ptr(), False),
            "strides": None,
            "version": 3,
        }


def host_resident(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros of ``shape`` in host memory, as a tensor of ``device``: on a GPU, a CUDA tensor whose
    storage is page-locked host memory (kernels read and write it across the bus); elsewhere an
    ordinary tensor of ``device``."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.zeros(shape, dtype=dtype, device=device)
    # cudaHostAlloc'ed (PyTorch's pinned allocator): under unified addressing its device address is
    # its host address. (Memory page-locked later by cudaHostRegister was not addressable so on the
    # H200: kernels writing it faulted.) Zeroed by the CPU, before any kernel sees it.
    host = torch.zeros(shape, dtype=dtype, pin_memory=True)
    with torch.cuda.device(device):
        view = torch.as_tensor(_HostMemoryView(host.view(_INTEGER[dtype.itemsize])), device=device)
    return view.view(dtype)


ALLOCATE_FIRST = (
    "HostKVCache on a GPU must be allocated before the model runs: give it batch_size, dtype and "
    "device (HostKVCache(config=..., max_cache_len=..., batch_size=1, dtype=torch.bfloat16, device='cuda'))"
)


class HostStaticLayer(StaticLayer):
    """A static cache layer with host-resident keys and values."""

    host_resident = True

    def lazy_initialization(self, key_states, value_states, *args, **kwargs):
        if key_states.device.type == "cuda" and torch.compiler.is_compiling():
            # host memory cannot be allocated inside a traced graph (a graph break there would
            # lose the site names of the rest of the layer)
            raise RuntimeError(ALLOCATE_FIRST)
        super().lazy_initialization(key_states, value_states, *args, **kwargs)
        if self.keys.device.type == "cuda":
            # the GPU tensors HF just made are freed here (they were never written)
            self.keys = _rehome(self.keys)
            self.values = _rehome(self.values)

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        if key_states.shape[-2] > 1 and keys.device.type == "cuda":
            return keys.clone(), values.clone()  # the prompt's attention reads GPU memory
        return keys, values


def _rehome(t: torch.Tensor) -> torch.Tensor:
    """``t``'s shape and dtype in host memory (zeros), marked static like HF marks its cache."""
    host = host_resident(t.shape, t.dtype, t.device)
    torch._dynamo.mark_static_address(host)
    return host


def allocate_up_front(cache, config, batch_size: int, dtype, device) -> None:
    """Allocate every layer of ``cache`` now (else each is allocated at its first update), with the
    K/V heads and head size of ``config``."""
    text = config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = text.num_key_value_heads or text.num_attention_heads
    dtype = dtype or getattr(text, "dtype", None) or torch.float32
    cache.early_initialization(batch_size, kv_heads, head_dim, dtype, torch.device(device))


class HostKVCache(StaticCache):
    """A ``transformers.StaticCache`` whose full-attention layers keep K/V in host memory, read in
    place by the GPU (sliding-window layers, small by construction, stay on the GPU). Pass it to
    ``generate`` as ``past_key_values``; with a Double Sparsity decode rule each step reads only the
    selected tokens' K/V across the bus. The arguments of ``StaticCache``, and on a GPU
    ``batch_size``, ``dtype`` and ``device``: host memory is allocated here, not in the compiled
    forward."""

    def __init__(self, config, max_cache_len: int, *args, batch_size=None, dtype=None, device=None, **kwargs):
        super().__init__(config, max_cache_len, *args, **kwargs)
        for layer in self.layers:
            if type(layer) is StaticLayer:  # not allocated yet: its lazy_initialization places it
                layer.__class__ = HostStaticLayer
        if batch_size is not None and device is not None:
            allocate_up_front(self, config, batch_size, dtype, device)

    def check_allocated_for(self, device) -> None:
        """Raise the clear error, before any compiled forward runs, where a model on ``device``
        would allocate this cache's host memory inside its graph."""
        lazy = any(isinstance(layer, HostStaticLayer) and not layer.is_initialized for layer in self.layers)
        if torch.device(device).type == "cuda" and lazy:
            raise RuntimeError(ALLOCATE_FIRST)
