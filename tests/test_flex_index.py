"""The benchmarks' export of an adaptive index to a FlexAttention BlockMask keeps the same pairs:
Flex (eager) on it equals our reference op on the index (CPU)."""

import sys
from pathlib import Path

import pytest
import torch
from attention_cases import make_case
from torch.nn.attention.flex_attention import flex_attention

from sparsecomp.kernels import index_positions, sparse_attention_reference
from sparsecomp.kernels.prefill.adaptive_index import block_topk_index, sample_index, vertical_slash_index
from sparsecomp.kernels.prefill.block_sparse_attention import _listed, index_pairs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from flex_index import index_block_mask  # noqa: E402

B, HQ, HKV, N, D, BLOCK = 1, 4, 2, 300, 16, 32


def build(pattern, q, k, pos):
    common = dict(scale=D**-0.5, causal=True, window=0, block_m=BLOCK, block_n=BLOCK)
    if pattern == "vertical_slash":
        return vertical_slash_index(q, k, pos, pos, None, 20, 12, last_q=32, sink=4, local=8, **common)
    if pattern == "sample":
        return sample_index(q, k, pos, pos, None, 0.7, window_ratio=0.05, sample_ratio=0.2, **common)
    return block_topk_index(q, k, pos, pos, None, 2, coverage=0.0, pool="mean", **common)


@pytest.mark.parametrize("pattern", ["vertical_slash", "sample", "block_topk"])
def test_flex_on_the_exported_mask_equals_our_op(pattern):
    torch.manual_seed(7)
    q, k, v, _ = make_case(B, HQ, HKV, N, N, D, torch.float32, pad=0)
    q = q * 3  # peaked attention: sparse selections that differ per head
    pos = index_positions(q, 2)
    index = build(pattern, q, k, pos)
    if pattern != "block_topk":
        assert index.columns is not None and (index.columns < N).any()  # stripes outside the blocks
    zeros = torch.zeros(HQ, dtype=torch.int32)
    ours = sparse_attention_reference(
        q, k, v, pos, pos, None, *index.tensors, zeros, zeros, D**-0.5, True, 0, 0.0, BLOCK, BLOCK
    )  # fmt: skip
    mask = index_block_mask(index, N, N, BLOCK)
    # Block level (eager Flex reads only the mask function): every kept pair lies in a block Flex
    # computes, and its full blocks hold only kept pairs.
    kept = index_pairs(
        pos, pos, None, *index.tensors, zeros, zeros, causal=True, window=0, block_m=BLOCK, block_n=BLOCK
    )(0, N)
    n_kb = -(-N // BLOCK)

    def pairs(blocks):
        return blocks.repeat_interleave(BLOCK, -2)[..., :N, :].repeat_interleave(BLOCK, -1)[..., :N]

    full = pairs(_listed(mask.full_kv_indices, mask.full_kv_num_blocks, n_kb))
    computed = full | pairs(_listed(mask.kv_indices, mask.kv_num_blocks, n_kb))
    assert (kept <= computed).all() and (full <= kept).all() and full.any()
    flex = flex_attention(q, k, v, block_mask=mask, scale=D**-0.5, enable_gqa=True)
    torch.testing.assert_close(flex, ours, atol=2e-5, rtol=2e-5)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True, scale=D**-0.5
    )
    assert not torch.allclose(ours, dense, atol=1e-3)  # the pattern is sparse: the check has teeth
