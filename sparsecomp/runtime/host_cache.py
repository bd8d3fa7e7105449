"""A static KV cache whose keys and values live in host memory and are read by the GPU in place:
the storage of Double Sparsity-Offload.

Double Sparsity-Offload keeps the full K/V of a sequence on the host and only the label cache (the
calibrated channels of K) on the GPU; each decode step scores the labels on the GPU, takes the top-k
tokens and reads only their K/V rows. Page-locked host memory is addressable from the GPU (unified
virtual addressing), so the cache tensors here are CUDA tensors whose storage is host memory: the
decode kernel gathers the selected rows across the bus itself. No staging buffer, no copy stream,
no host sync (a decode step stays CUDA-graph capturable), and the graphs sparsecomp compiles are
the same as for a GPU cache. A head whose rule is dense reads its whole cache across the bus each
step, what a FlexGen-style full copy costs. The label cache and Quest's page bounds are allocated
on the site's device, the GPU.

A multi-token update (the prompt) returns a GPU copy of the layer's cache for that forward only:
prefill attention reads every key many times, which must not cross the bus each time.

On a CPU model the cache is an ordinary static cache (host memory is the model's memory). Needs
transformers (the ``hf`` extra).
"""

from __future__ import annotations

import weakref

import torch
from transformers import StaticCache
from transformers.cache_utils import StaticLayer

_TYPESTR = {1: "|u1", 2: "<i2", 4: "<i4", 8: "<i8"}  # bytes per element -> an integer of that size


class _HostMemoryView:
    """The CUDA array interface of a page-locked host tensor; the GPU tensor made from it keeps
    this object, and so the host tensor, alive."""

    def __init__(self, host: torch.Tensor, device: torch.device):
        self.host = host
        self.device = device
        self.__cuda_array_interface__ = {
            "shape": tuple(host.shape),
            "typestr": _TYPESTR[host.element_size()],
            "data": (host.data_ptr(), False),
            "strides": None,
            "version": 3,
        }


def _page_lock(host: torch.Tensor) -> None:
    """Register ``host``'s memory with the driver (page-locked, mapped, for every device); undone
    when the tensor is freed. (``pin_memory`` would round the size up to a power of two.)"""
    cudart = torch.cuda.cudart()
    nbytes = host.numel() * host.element_size()
    portable_and_mapped = 0x1 | 0x2  # cudaHostRegisterPortable | cudaHostRegisterMapped
    err = cudart.cudaHostRegister(host.data_ptr(), nbytes, portable_and_mapped)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed (error {int(err)}): is host memory short?")
    weakref.finalize(host, cudart.cudaHostUnregister, host.data_ptr())


def host_resident(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros of ``shape`` in host memory, as a tensor of ``device``: on a GPU, a CUDA tensor whose
    storage is page-locked host memory (kernels read and write it across the bus); elsewhere an
    ordinary tensor of ``device``."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.zeros(shape, dtype=dtype, device=device)
    host = torch.empty(shape, dtype=dtype)
    _page_lock(host)
    with torch.cuda.device(device):
        view = torch.as_tensor(_HostMemoryView(host.view(_integer_dtype(dtype)), device), device=device)
    return view.view(dtype).zero_()  # zeroed by the GPU across the bus: faster than by one CPU core


def _integer_dtype(dtype: torch.dtype) -> torch.dtype:
    size = torch.empty((), dtype=dtype).element_size()
    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]


def _host_layer_class(base: type) -> type:
    """``base`` (a transformers static cache layer class) with host-resident keys and values."""

    class HostLayer(base):
        host_resident = True

        def lazy_initialization(self, key_states, value_states, *args, **kwargs):
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

    HostLayer.__name__ = HostLayer.__qualname__ = "Host" + base.__name__
    return HostLayer


HostStaticLayer = _host_layer_class(StaticLayer)


def _rehome(t: torch.Tensor) -> torch.Tensor:
    """``t``'s shape and dtype in host memory (zeros), marked static like HF marks its cache."""
    host = host_resident(t.shape, t.dtype, t.device)
    if not torch.compiler.is_compiling():
        torch._dynamo.mark_static_address(host)
    return host


class HostKVCache(StaticCache):
    """A ``transformers.StaticCache`` whose full-attention layers keep K/V in host memory, read in
    place by the GPU (sliding-window layers, small by construction, stay on the GPU). Pass it to
    ``generate`` as ``past_key_values``; with a Double Sparsity decode rule each step reads only the
    selected tokens' K/V across the bus. Same arguments as ``StaticCache``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for layer in self.layers:
            if type(layer) is StaticLayer:  # not allocated yet: its lazy_initialization places it
                layer.__class__ = HostStaticLayer
