"""Block and column lists of selected block diagonals: the Triton kernels (interpreter on CPU) equal
the references (selection matrix, then compaction; broadcast tensors) exactly: counts, and block
lists up to their counts."""

import pytest
import torch
from attention_cases import assert_same_lists

from sparsecomp.kernels.prefill.block_lists import (
    block_limits,
    column_lists_reference,
    column_lists_triton,
    diagonal_lists_reference,
    diagonal_lists_triton,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

CASES = [  # (B, Hq, Nq, Nk, block, causal, window, pad, shared positions)
    (1, 2, 1, 1, 16, True, 0, 0, True),
    (2, 3, 150, 150, 16, True, 0, 9, False),  # left padding in batch 1
    (1, 2, 100, 260, 32, True, 0, 0, True),  # a chunk after cached keys (Nq < Nk)
    (2, 2, 200, 200, 16, True, 40, 5, False),  # sliding window and padding
    (1, 3, 97, 97, 16, False, 0, 0, True),  # not causal
]


@pytest.mark.parametrize("case", CASES)
def test_diagonal_lists_kernel_equals_reference(case):
    b, hq, n_q, n_k, block, causal, window, pad, shared = case
    torch.manual_seed(n_k + pad)
    n_kb = -(-n_k // block)
    base = n_kb + 1
    rel_set = (torch.rand(b, hq, 2 * base + 1, device=DEVICE) < 0.3).to(torch.int8)
    rel_set[..., base] = 1  # the diagonal, as vertical-slash always keeps it
    k_pos = torch.arange(n_k, device=DEVICE)[None]
    q_pos = k_pos[:, n_k - n_q :]
    key_ok = None
    if pad:
        key_ok = torch.ones(b, n_k, dtype=torch.bool, device=DEVICE)
        key_ok[-1, :pad] = False
    if not shared:
        q_pos, k_pos = q_pos.expand(b, -1), k_pos.expand(b, -1)
    limits = block_limits(q_pos, k_pos, key_ok, block, block)
    got = diagonal_lists_triton(rel_set, *limits, base, causal, window, chunk=16)
    want = diagonal_lists_reference(rel_set, *limits, base, causal, window)
    assert want[1].sum() + want[3].sum() > 0
    assert_same_lists(got, want)


@pytest.mark.parametrize("n_q, n_k, width", [(1, 1, 1), (150, 150, 40), (100, 260, 300), (97, 97, 5)])
def test_column_lists_kernel_equals_reference(n_q, n_k, width):
    """Random ascending kept columns (Nk in the unused slots), random selected diagonals; several
    chunks per query block; a chunk after cached keys (Nq < Nk)."""
    b, hq, block = 2, 3, 16
    torch.manual_seed(n_k + width)
    n_kb = -(-n_k // block)
    base = n_kb + 1
    rel_set = (torch.rand(b, hq, 2 * base + 1, device=DEVICE) < 0.3).to(torch.int8)
    kept = torch.rand(b, hq, n_k, device=DEVICE) < 0.2
    ids = torch.where(kept, torch.arange(n_k, device=DEVICE), n_k).sort(-1).values[..., :width]
    ids = torch.nn.functional.pad(ids, (0, width - ids.shape[-1]), value=n_k).to(torch.int32)
    args = (ids, rel_set, base, -(-n_q // block), n_k, n_k - n_q, block, block)
    got = column_lists_triton(*args, chunk=16)
    want = column_lists_reference(*args)
    if n_k > 1:  # some columns stay, some are replaced (their block is computed whole)
        kept_per_block = (want[0] < n_k).sum()
        assert 0 < kept_per_block < (ids < n_k).sum() * want[0].shape[2]
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and torch.equal(g.cpu(), w.cpu())
