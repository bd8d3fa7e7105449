"""Attention across ranks: context-parallel sparse prefill over torch.distributed."""

from .context_parallel import (
    ContextChunk,
    block_topk_index_for_chunk,
    context_parallel_attention,
    index_for_chunk,
    listed_key_blocks,
    sample_index_for_chunk,
    vertical_slash_index_for_chunk,
)
from .decode import generate_context_parallel
from .gather_cache import gather_cache, gather_streaming_cache

__all__ = [
    "ContextChunk",
    "block_topk_index_for_chunk",
    "context_parallel_attention",
    "gather_cache",
    "gather_streaming_cache",
    "generate_context_parallel",
    "index_for_chunk",
    "listed_key_blocks",
    "sample_index_for_chunk",
    "vertical_slash_index_for_chunk",
]
