"""Context parallel inside ``sparsecomp.compile(..., context_parallel=True)``: every rank runs the
model on its chunk of the sequence (its ``input_ids`` rows, ``position_ids`` their global
positions), and each prefill site whose mask is proven plain causal becomes this op: the rank's
block index of its static rules (built alone from positions), the K/V blocks it lists received
from their ranks, the block-sparse kernel on them. The default process group; the sequence splits
in equal chunks of whole blocks, rank order = sequence order."""

from __future__ import annotations

import collections

import torch
import torch.distributed as dist

from sparsecomp.kernels.prefill.block_index import build_block_index

from .context_parallel import ContextChunk, context_parallel_attention

# K/V bytes each site (by name) received on this rank at its last call, for reports and tests.
received_bytes: collections.Counter = collections.Counter()


@torch.library.custom_op("sparsecomp::context_parallel_attention", mutates_args=())
def context_parallel_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink: list[int], window: list[int], scale: float,
    block: int, site: str,
) -> torch.Tensor:  # fmt: skip
    """Causal attention of this rank's rows over the whole sequence's keys, under the heads' local
    rules (sink, window per query head; 0, 0 = every earlier key)."""
    head_sink, head_window = (torch.tensor(x, dtype=torch.int32, device=q.device) for x in (sink, window))
    chunk = ContextChunk(q.shape[2] * dist.get_world_size(), dist.get_rank(), dist.get_world_size(), block)
    q_pos = torch.arange(chunk.start, chunk.stop, device=q.device)[None]
    k_pos = torch.arange(chunk.length, device=q.device)[None]
    index = build_block_index(q_pos, k_pos, None, head_sink, head_window, causal=True, window=0, block_m=block,
                              block_n=block, max_blocks=None)  # fmt: skip
    out, received = context_parallel_attention(q, k, v, index, chunk, head_sink=head_sink, head_window=head_window,
                                               scale=scale)  # fmt: skip
    received_bytes[site] = received
    return out


@context_parallel_op.register_fake
def _context_parallel_fake(q, k, v, sink, window, scale, block, site):
    return q.new_empty(q.shape)
