"""Where a KV cache's bytes live: per layer, keys and values on the GPU or in host memory, the decode
state sparsecomp keeps beside them (label cache, page bounds) and what a GPU static cache of the same
shapes would take. Counted from the tensors themselves, not from a formula."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

GIB = 2**30


@dataclass
class LayerMemory:
    layer: int
    kv_gpu: int = 0  # bytes of keys and values in GPU memory
    kv_host: int = 0  # ... in host memory (a host-resident cache layer)
    state_gpu: int = 0  # sparsecomp's decode state for this layer's site(s)
    dense: int = 0  # keys and values of a GPU cache of the same shapes
    sites: list[str] = field(default_factory=list)

    @property
    def gpu(self) -> int:
        return self.kv_gpu + self.state_gpu


@dataclass
class MemoryReport:
    layers: list[LayerMemory]

    def total(self, name: str) -> int:
        return sum(getattr(row, name) for row in self.layers)

    def __str__(self) -> str:
        lines = ["layer | site | KV on GPU GiB | KV on host GiB | decode state GiB | dense GPU cache GiB"]
        rows = [*self.layers, None]
        for row in rows:
            if row is None:
                values = ("total", "", *(self.total(n) for n in ("kv_gpu", "kv_host", "state_gpu", "dense")))
            else:
                values = (row.layer, ", ".join(row.sites) or "-", row.kv_gpu, row.kv_host, row.state_gpu, row.dense)
            head, site, *sizes = values
            lines.append(" | ".join([str(head), site, *(f"{b / GIB:.3f}" for b in sizes)]))
        gpu, dense = self.total("gpu"), self.total("dense")
        if dense:
            lines.append(f"GPU bytes for KV and state: {gpu / dense:.1%} of a dense GPU cache")
        return "\n".join(lines)


def _bytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _dense_bytes(layer, t) -> int:
    """The bytes ``t`` would take in a static cache layer of the layer's full length: a ring that
    keeps fewer tokens (``StreamingKVCache``) stores ``t.shape[-2]`` of ``max_cache_len``."""
    if not isinstance(t, torch.Tensor) or not t.dim():
        return 0
    full = getattr(layer, "max_cache_len", None)
    return _bytes(t) * full // t.shape[-2] if isinstance(full, int) and full > t.shape[-2] else _bytes(t)


def _layer_of(site: str) -> int | None:
    """The decoder layer index in a site's module path (Hugging Face names: ``...layers.<i>.self_attn``)."""
    found = re.search(r"layers\.(\d+)\.", site + ".")
    return int(found.group(1)) if found else None


def kv_memory(cache, states=None) -> MemoryReport:
    """The bytes of ``cache`` (a transformers Cache with ``layers``) and of ``states`` (a compiled
    model's ``DecodeStates``), per decoder layer. A state whose site names no layer is an error: its
    bytes would otherwise go uncounted."""
    rows = []
    for i, layer in enumerate(cache.layers):
        row = LayerMemory(layer=i)
        for part in getattr(layer, "sublayers", [layer]):  # a layer of head groups: each group's
            for t in (getattr(part, "keys", None), getattr(part, "values", None)):
                size = _bytes(t)
                row.dense += _dense_bytes(part, t)
                if getattr(part, "host_resident", False) or (isinstance(t, torch.Tensor) and t.device.type == "cpu"):
                    row.kv_host += size
                else:
                    row.kv_gpu += size
        row.state_gpu += sum(_bytes(t) for t in getattr(layer, "state_tensors", tuple)())  # e.g. eviction ranks
        rows.append(row)
    for (site, *_), tensors in ({} if states is None else states.tensors).items():
        index = _layer_of(site)
        if index is None or index >= len(rows):
            raise ValueError(f"decode state of site {site!r} names no layer of this cache ({len(rows)} layers)")
        rows[index].state_gpu += sum(_bytes(t) for t in tensors)
        rows[index].sites.append(site)
    return MemoryReport(rows)
