"""Non-finite inputs propagate like SDPA through both paths of the op (the PyTorch reference and the
Triton kernel, interpreter on CPU): a NaN in a key poisons exactly the rows that attend to it.

Regression: the reference divided only where the softmax sum was > 0, which is False for NaN, so the
rows that attend to a NaN key came back as exact zeros (finite logits where eager gives NaN). Rows
that keep no key at all still give zeros: that is the op's documented semantics, not an input's NaN.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from sparsecomp.kernels import build_block_index, index_positions, sparse_attention_reference
from sparsecomp.kernels.prefill.block_sparse_attention import kept_pairs, sparse_attention_triton

N, D, BLOCK = 48, 16, 16
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the kernel: compiled on a GPU, else interpreted


def run_paths(q, k, v, sinks, windows, key_ok=None):
    """(reference, kernel) outputs and the kept-pair mask (B, Hq, N, N) of a causal site."""
    q_pos, k_pos = index_positions(q, 2), index_positions(k, 2)
    sink, win = torch.tensor(sinks, dtype=torch.int32), torch.tensor(windows, dtype=torch.int32)
    index = build_block_index(
        q_pos, k_pos, key_ok, sink, win, causal=True, window=0, block_m=BLOCK, block_n=BLOCK, max_blocks=None
    )
    args = (q, k, v, q_pos, k_pos, key_ok, *index.tensors, sink, win, 1 / math.sqrt(D), True, 0, 0.0, BLOCK, BLOCK)
    start = torch.zeros(1, dtype=torch.long) if key_ok is None else key_ok.int().argmax(-1)
    keep = kept_pairs(q_pos, k_pos, key_ok, start, sink, win, causal=True, window=0)
    kernel = sparse_attention_triton(*(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args)).cpu()
    return sparse_attention_reference(*args), kernel, keep.expand(*q.shape[:3], k.shape[2])


def inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, h, N, D, generator=gen) for h in (2, 1, 1)]  # Hq = 2 on one KV head


def golden(q, k, v, keep):
    """Dense masked SDPA on finite inputs; rows that keep nothing are zeros."""
    k, v = k.expand(-1, q.shape[1], -1, -1), v.expand(-1, q.shape[1], -1, -1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=1 / math.sqrt(D))
    return torch.where(keep.any(-1, keepdim=True), out, 0.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_key_poisons_the_rows_that_attend_to_it(bad):
    """Head 0 dense causal, head 1 streaming (sink 2, window 8); key 20 non-finite (an inf in one
    channel gives scores of +inf or -inf: +inf rows are NaN, -inf ones simply drop the key)."""
    q, k, v = inputs()
    clean = k.clone()
    k[0, 0, 20, 3] = bad
    ref, tri, keep = run_paths(q, k, v, [0, 2], [0, 8])
    sdpa = F.scaled_dot_product_attention(q, k.expand(-1, 2, -1, -1), v.expand(-1, 2, -1, -1), is_causal=True)
    rows_nan = ref.isnan().any(-1)
    assert torch.equal(rows_nan, tri.isnan().any(-1))  # same pattern in both paths
    assert torch.equal(rows_nan, ref.isnan().all(-1))  # a poisoned row is NaN throughout
    assert torch.equal(rows_nan[0, 0], sdpa.isnan().any(-1)[0, 0])  # the dense head: SDPA's own pattern
    attends = keep[..., 20]
    if bad != bad:  # NaN: exactly the rows that keep key 20
        assert torch.equal(rows_nan, attends)
        assert attends[0, 1].sum() == 8  # rows 20..27 in head 1's window
    else:  # inf: the rows whose score with key 20 is +inf
        plus_inf = attends & (q[..., 3] > 0)
        assert torch.equal(rows_nan, plus_inf) and plus_inf.any() and (attends & ~plus_inf).any()
    finite = ~rows_nan
    # The other rows are finite and correct: they do not keep key 20, or its score is -inf (p = 0).
    want = golden(q, clean, v, keep & (torch.arange(N) != 20))
    for out in (ref, tri):
        assert torch.isfinite(out[finite]).all()
        torch.testing.assert_close(out[finite], want[finite], atol=1e-5, rtol=1e-5)


def test_nan_query_row_and_padded_rows():
    """A NaN in query row 30 poisons that row only; with 3 left-padded keys, the query rows that
    keep no key (0..2 under the causal mask) stay exact zeros beside it."""
    q, k, v = inputs(1)
    q[0, 1, 30, 0] = float("nan")
    key_ok = torch.ones(1, N, dtype=torch.bool)
    key_ok[:, :3] = False
    ref, tri, keep = run_paths(q, k, v, [0, 2], [0, 8], key_ok)
    want_nan = torch.zeros(1, 2, N, dtype=torch.bool)
    want_nan[0, 1, 30] = True
    for out in (ref, tri):
        assert torch.equal(out.isnan().any(-1), want_nan)
        assert (out[:, :, :3] == 0).all()
        finite = ~want_nan
        torch.testing.assert_close(out[finite], golden(q.nan_to_num(), k, v, keep)[finite], atol=1e-5, rtol=1e-5)
