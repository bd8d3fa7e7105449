"""Greedy decoding spread over the ranks after a context-parallel prefill.

Every rank keeps its own chunk's K/V (no rank holds the whole sequence); each decode step runs on
every rank with the same token, each decode site attending over the rank's chunk (and, on the last
rank, over the decoded tokens) and merging the partial results across the ranks
(``sparsecomp::context_parallel_decode``). The logits, and so the greedy tokens, are the same on
every rank. Dense, streaming, Double Sparsity and Quest decode rules (their keys chosen over the
whole sequence). Greedy by default; ``pick`` (a sampler) runs on rank 0
only and its tokens are broadcast, so every rank feeds the same one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .context_parallel import ContextChunk


def generate_context_parallel(
    model, cache, next_ids: torch.Tensor, chunk: ContextChunk, max_new_tokens: int, pick=None
) -> torch.Tensor:
    """(B, max_new_tokens) tokens after a sequence prefilled over the ranks (a collective):
    ``model`` compiled with ``context_parallel=True`` (the one that prefilled), ``cache`` this
    rank's cache after its chunk's prefill, ``next_ids`` (B, 1) the token after the prefilled ones.
    ``pick``: last-position logits (B, vocab) -> (B, 1) token ids, e.g. a sampler (default: greedy)."""
    ids, out = next_ids, []
    for step in range(max_new_tokens):
        position = torch.full_like(ids, chunk.length + step)  # global: where the rotary embedding goes
        local = torch.tensor([cache.get_seq_length()], device=ids.device)  # this rank's cache slot
        with torch.no_grad():
            logits = model(input_ids=ids, position_ids=position, cache_position=local, past_key_values=cache).logits
        if pick is None:
            ids = logits[:, -1:].argmax(-1)  # the same logits on every rank: the same token
        else:
            ids = (
                pick(logits[:, -1]).to(ids.dtype).reshape(ids.shape) if dist.get_rank() == 0 else torch.empty_like(ids)
            )
            dist.broadcast(ids, 0)  # rank 0's choice, fed on every rank
        out.append(ids)
    return torch.cat(out, dim=1)
