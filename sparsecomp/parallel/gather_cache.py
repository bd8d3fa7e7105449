"""Decoding after a context-parallel prefill: the ranks' KV chunks joined on one rank.

After ``compile(..., context_parallel=True)`` prefills a sequence split over the ranks, each rank's
cache holds the K/V of its own chunk of tokens. ``gather_cache`` joins them, in sequence order, into
one ``transformers.DynamicCache`` on rank ``dst`` (a collective: every rank calls it); that rank then
decodes as one process does, with a model compiled without ``context_parallel`` (any decode rule):
``model.generate(ids, past_key_values=cache, ...)`` with ``ids`` the whole prompt plus at least the
token after the prefilled ones. The whole sequence's K/V must fit on that rank.

``gather_streaming_cache`` moves only the keys a streaming decode rule reads (the first ``sink``
tokens and the last ``window``) into a ``StreamingKVCache``: a sequence prefilled over several GPUs
then decodes on one in the memory of ``sink + window`` tokens.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .context_parallel import ContextChunk


def gather_cache(cache, chunk: ContextChunk, dst: int = 0, config=None, group=None):
    """The K/V of every rank's chunk, in sequence order, as a DynamicCache on rank ``dst`` (None on
    the others). ``cache``: this rank's cache after its chunk's prefill (it must hold exactly the
    chunk's tokens); ``config``: the model's config, for caches with sliding-window layers."""
    from transformers import DynamicCache

    rank = dist.get_rank(group)
    out = DynamicCache(config=config) if rank == dst and config is not None else DynamicCache()
    for index, layer in enumerate(cache.layers):
        _check_chunk(layer, index, chunk)
        whole = [_gather(t, dst, chunk.world, rank, group) for t in (layer.keys, layer.values)]
        if rank == dst:
            out.update(*whole, index)
    return out if rank == dst else None


def _gather(t: torch.Tensor, dst: int, world: int, rank: int, group) -> torch.Tensor | None:
    """Every rank's ``t`` (B, H, chunk, D), joined along the sequence on ``dst``."""
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(world)] if rank == dst else None
    dist.gather(t, parts, dst=dst, group=group)
    return torch.cat(parts, dim=2) if rank == dst else None


def gather_streaming_cache(cache, chunk: ContextChunk, config, max_cache_len: int, sink: int, window: int,
                           dst: int = 0, group=None):  # fmt: skip
    """The first ``sink`` and the last ``window`` tokens' K/V of every layer, as a
    ``StreamingKVCache`` on rank ``dst`` (None on the others), for decoding with the decode rule
    ``streaming:sink=SINK,window=WINDOW``. Each rank sends only its kept rows."""
    from sparsecomp.runtime.streaming_cache import StreamingKVCache, kept_positions

    rank = dist.get_rank(group)
    first = cache.layers[0].keys
    ring = None
    if rank == dst:
        ring = StreamingKVCache(config, max_cache_len, sink=sink, window=window, batch_size=first.shape[0],
                                dtype=first.dtype, device=first.device)  # fmt: skip
    kept = torch.tensor(kept_positions(chunk.length, sink, window), device=first.device)
    mine = (kept >= chunk.start) & (kept < chunk.stop)
    for index, layer in enumerate(cache.layers):
        _check_chunk(layer, index, chunk)
        # each kept token is one rank's: the others add exact zeros in its place
        parts = []
        for t in (layer.keys, layer.values):
            part = t.new_zeros(*t.shape[:2], len(kept), t.shape[3])
            part[:, :, mine] = t[:, :, kept[mine] - chunk.start]
            dist.reduce(part, dst, group=group)
            parts.append(part)
        if rank == dst:
            ring.layers[index].load(kept, *parts, chunk.length)
    return ring


def _check_chunk(layer, index: int, chunk: ContextChunk) -> None:
    if layer.keys.shape[2] != chunk.size:
        raise ValueError(
            f"gather_cache: layer {index} holds {layer.keys.shape[2]} tokens, the chunk {chunk.size}: "
            "gather right after the prefill, before any decode step"
        )
