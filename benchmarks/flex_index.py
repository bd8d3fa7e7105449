"""A sparsecomp index as a FlexAttention BlockMask that keeps the same pairs, so a benchmark can time
Flex on exactly our pattern (its block mask prebuilt, as our index is).

Scope: a causal prefill site without padding (query row i at key index i + Nk - Nq), and single
columns listed per query block as the adaptive builders list them: a prefix of one list per head,
entries inside a listed block replaced by Nk. Then a pair (q, kv) is kept when it is causal and
either its block is listed (full or part) or kv is one of the head's kept columns; the union of a
head's column lists over its query blocks is that head's column set.

Flex computes whole blocks: a listed block goes to its full list when ours does, to its partial
list otherwise; a block holding kept columns but not listed becomes a partial block (the mask picks
the columns out), so Flex does the work a block-granular kernel must do for a vertical stripe.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask

from sparsecomp.kernels.prefill.block_lists import compact
from sparsecomp.kernels.prefill.block_sparse_attention import _listed


def _column_set(columns: torch.Tensor, column_count: torch.Tensor, n_k: int) -> torch.Tensor:
    """(B, H, Nk) whether a key is listed as a column for some query block of the head."""
    b, h = column_count.shape[:2]
    slot = torch.arange(columns.shape[-1], device=columns.device)
    ids = torch.where(slot < column_count[..., None], columns.long().clamp(0, n_k), n_k).expand(b, h, -1, -1)
    kept = torch.zeros(b, h, n_k + 1, dtype=torch.bool, device=columns.device)
    return kept.scatter_(-1, ids.reshape(b, h, -1), True)[..., :n_k]


def index_block_mask(index, n_q: int, n_k: int, block: int) -> BlockMask:
    """The BlockMask (``BLOCK_SIZE`` = ``block``, square blocks) keeping the pairs ``index`` keeps
    on a causal prefill site (see the module notes)."""
    full_blocks, full_count, part_blocks, part_count, columns, column_count = index.tensors
    b, h, n_qb = full_count.shape
    n_kb = -(-n_k // block)
    shift = n_k - n_q
    full = _listed(full_blocks, full_count, n_kb).expand(b, h, n_qb, n_kb)
    part = _listed(part_blocks, part_count, n_kb).expand(b, h, n_qb, n_kb)
    listed = (full | part).contiguous()
    device = full_count.device
    if columns is not None:
        kept = _column_set(columns, column_count, n_k)
        padded = torch.nn.functional.pad(kept, (0, n_kb * block - n_k))
        column_blocks = padded.view(b, h, n_kb, block).any(-1)
        last_key = ((torch.arange(n_qb, device=device) + 1) * block + shift).clamp_max(n_k) - 1
        visible = torch.arange(n_kb, device=device)[None, :] * block <= last_key[:, None]
        part = part | (column_blocks[:, :, None, :] & visible & ~listed)
    else:
        kept = torch.zeros(b, h, n_k, dtype=torch.bool, device=device)
    full_ids, full_n = compact(full.contiguous())
    part_ids, part_n = compact(part.contiguous())

    def keep(bi, hi, q_idx, kv_idx):
        in_block = listed[bi, hi, q_idx // block, kv_idx // block]
        return (q_idx + shift >= kv_idx) & (in_block | kept[bi, hi, kv_idx])

    return BlockMask.from_kv_blocks(
        part_n, part_ids, full_n, full_ids, BLOCK_SIZE=block, mask_mod=keep, seq_lengths=(n_q, n_k)
    )
