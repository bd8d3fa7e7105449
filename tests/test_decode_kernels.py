"""Decode kernels against their PyTorch references and an fp64 golden (interpreter on CPU; compiled
on the GPU): split-K attention over selected tokens, label scores, page bounds, selection."""

import math

import pytest
import torch

from sparsecomp.kernels.decode.selection import (
    key_labels,
    label_scores_reference,
    label_scores_triton,
    page_bounds_reference,
    page_bounds_triton,
    page_min_max,
    page_tokens,
    query_channels,
    top_tokens,
)
from sparsecomp.kernels.decode.sparse_decode import (
    decode_keep,
    sparse_decode,
    sparse_decode_reference,
    sparse_decode_triton,
)
from sparsecomp.kernels.decode.top_select import top_indices_reference, top_indices_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}

# (B, Hq, Hkv, Hs, Nq, Nk, D, S, padded): odd sizes, GQA groups, per-query-head selection, 2 query rows
CASES = [
    (1, 4, 2, 2, 1, 77, 16, 19, False),
    (2, 6, 2, 6, 1, 130, 24, 40, True),
    (2, 8, 2, 2, 2, 64, 32, 64, True),
    (1, 2, 1, 1, 1, 300, 64, 257, False),
]


def make_inputs(b, hq, hkv, hs, nq, nk, d, s, padded, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(dtype) for h, n in ((hq, nq), (hkv, nk), (hkv, nk)))
    # each selection head lists s distinct keys (some may be invalid: padding or after the query)
    tokens = torch.stack([torch.randperm(nk, generator=g)[:s] for _ in range(b * hs)]).view(b, hs, s).int()
    q_last = torch.tensor([nk - 1 - 3 * i for i in range(b)], dtype=torch.int32)
    key_ok = None
    if padded:
        key_ok = torch.ones(b, nk, dtype=torch.bool)
        key_ok[-1, :5] = False  # the last row is left-padded
    return [t.to(DEVICE) if t is not None else None for t in (q, k, v, tokens, q_last, key_ok)]


def golden(q, k, v, tokens, q_last, key_ok, scale):
    """fp64: dense attention restricted to the kept tokens, by a full (Nq, Nk) mask."""
    b, hq, nq, d = q.shape
    nk = k.shape[2]
    keep_slots = decode_keep(tokens, q_last, key_ok, nq, nk, hq)  # (B, Hq, Nq, S)
    hs = tokens.shape[1]
    idx = tokens.long().clamp(0, nk - 1).repeat_interleave(hq // hs, dim=1)[:, :, None, :].expand(-1, -1, nq, -1)
    mask = torch.zeros(b, hq, nq, nk, dtype=torch.bool, device=q.device).scatter(3, idx, keep_slots)
    kk, vv = (t.double().repeat_interleave(hq // k.shape[1], dim=1) for t in (k, v))
    s = (q.double() @ kk.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ vv


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_sparse_decode_kernel_matches_reference_and_golden(case, dtype):
    q, k, v, tokens, q_last, key_ok = make_inputs(*case, dtype)
    scale = 1 / math.sqrt(q.shape[-1])
    poisoned = torch.full_like(q, float("nan"))
    out = sparse_decode_triton(q, k, v, tokens, q_last, key_ok, scale, out=poisoned)
    ref = sparse_decode_reference(q, k, v, tokens, q_last, key_ok, scale)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])
    gold = golden(q, k, v, tokens, q_last, key_ok, scale)
    # against fp64: no worse than a few times the rounding of the output dtype
    eps = torch.finfo(dtype).eps
    assert (out.double() - gold).abs().max() <= 8 * eps * max(1.0, gold.abs().max().item())


def test_sparse_decode_many_splits_and_softcap():
    """A long list split across many programs (the combine), softcap on, a row keeping nothing."""
    q, k, v, tokens, q_last, key_ok = make_inputs(2, 4, 2, 2, 1, 700, 32, 650, True, torch.float32, seed=3)
    key_ok[0] = False  # batch row 0 keeps no key: zeros, never NaN
    out = sparse_decode_triton(q, k, v, tokens, q_last, key_ok, 0.2, softcap=5.0, block_n=16)
    ref = sparse_decode_reference(q, k, v, tokens, q_last, key_ok, 0.2, softcap=5.0)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    assert (out[0] == 0).all() and out[1].abs().sum() > 0


def test_sparse_decode_every_token_listed_equals_dense_attention():
    q, k, v, _, _, _ = make_inputs(1, 4, 2, 2, 1, 50, 16, 50, False, torch.float32)
    tokens = torch.arange(50, dtype=torch.int32, device=DEVICE).flip(0).expand(1, 2, 50).contiguous()
    q_last = torch.tensor([49], dtype=torch.int32, device=DEVICE)
    out = sparse_decode(q, k, v, tokens, q_last, None, 0.25, 0.0)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.25, enable_gqa=True)
    torch.testing.assert_close(out, dense, atol=2e-5, rtol=2e-5)


def test_sparse_decode_refuses_bad_selection_heads():
    q, k, v, tokens, q_last, key_ok = make_inputs(1, 4, 2, 2, 1, 20, 16, 5, False, torch.float32)
    with pytest.raises(ValueError, match="selection heads 3"):
        sparse_decode_reference(q, k, v, tokens[:, :1].expand(1, 3, 5).contiguous(), q_last, key_ok, 0.25)


@pytest.mark.parametrize("n_sel", [2, 4])
def test_label_scores_kernel_matches_reference(n_sel):
    q, k, _, _, q_last, key_ok = make_inputs(2, 4, 2, 2, 2, 150, 32, 1, True, torch.float32)
    channels = torch.stack([torch.randperm(32)[:5] for _ in range(2)]).to(DEVICE)
    labels = key_labels(k, channels)
    assert torch.equal(labels[0, 1, 7], k[0, 1, 7, channels[1]])
    qc = query_channels(q, channels)
    out = label_scores_triton(qc, labels, q_last, key_ok, n_sel, block_n=32)
    ref = label_scores_reference(qc, labels, q_last, key_ok, n_sel)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.isinf(ref[1, :, :5]).all() and torch.isfinite(ref[0, :, : 150 - 2]).all()


def test_page_bounds_bound_every_key_and_kernel_matches_reference():
    page = 8
    q, k, _, _, q_last, key_ok = make_inputs(2, 4, 2, 2, 1, 96, 16, 1, True, torch.float32, seed=5)
    kmin, kmax, page_ok = page_min_max(k, key_ok, page)
    out = page_bounds_triton(q, kmin, kmax, q_last, page_ok, page, 2, block_p=16)
    ref = page_bounds_reference(q, kmin, kmax, q_last, page_ok, page, 2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # the bound is >= the exact score of every valid key of its page, for every query head of the group
    exact = (q.float() @ k.float().repeat_interleave(2, dim=1).transpose(-1, -2))[:, :, 0]  # (B, Hq, Nk)
    exact = exact.masked_fill(~key_ok[:, None], float("-inf")).view(2, 2, 2, 12, page).amax((2, 4))
    finite = torch.isfinite(exact)
    assert (ref[finite] >= exact[finite] - 1e-5).all()


def test_top_tokens_and_page_tokens():
    scores = torch.tensor([[[0.1, 5.0, -1.0, 3.0, float("-inf")]]])
    assert sorted(top_tokens(scores, 2)[0, 0].tolist()) == [1, 3]
    assert page_tokens(torch.tensor([[[2, 0]]]), 4).tolist() == [[[8, 9, 10, 11, 0, 1, 2, 3]]]


@pytest.mark.parametrize(
    "shape, n, chunk",
    [((2, 3, 5000), 700, None), ((1, 1, 100), 1, None), ((1, 1, 4097), 4097, 1024), ((3, 2300), 2299, 512),
     ((1, 2, 2048), 128, 2048)],
)  # fmt: skip
def test_radix_top_indices_match_a_stable_sort(shape, n, chunk):
    """Fresh random scores with masked (-inf) keys: the radix selection lists the reference's keys,
    in its order (those before the n-th best, then its ties, each by index), whatever the chunk."""
    scores = torch.randn(shape, device=DEVICE)
    scores[..., 3::7] = float("-inf")
    got = top_indices_triton(scores, n, chunk)
    assert torch.equal(got.cpu(), top_indices_reference(scores, n).cpu())
    nth_best = torch.topk(scores, n, dim=-1).values[..., -1:]
    assert (torch.gather(scores, -1, got.long()) >= nth_best).all()
    assert (got.sort(-1).values.diff(dim=-1) > 0).all()  # each key once


def test_top_indices_op_compiles_without_a_graph_break():
    """The op a compiled decode step would call: its fake gives the shape, its result the reference's."""
    scores = torch.randn(2, 3, 700, device=DEVICE)
    op = torch.ops.sparsecomp.top_indices
    got = torch.compile(lambda s: op(s, 40), fullgraph=True, backend="eager")(scores)
    assert got.shape == (2, 3, 40) and got.dtype == torch.int32
    assert torch.equal(got.cpu(), top_indices_reference(scores, 40).cpu())


def test_radix_top_indices_break_ties_by_index_and_signed_zeros_tie():
    """Few distinct values (every level's threshold bin is crowded), negatives and signed zeros."""
    scores = torch.randint(-3, 3, (2, 3000), device=DEVICE).float() * 0.37
    scores[0, :10] = -0.0
    for n in (1, 1500, 2999):
        assert torch.equal(top_indices_triton(scores, n).cpu(), top_indices_reference(scores, n).cpu())
    zeros = torch.zeros(1, 3000, device=DEVICE)
    zeros[0, 5] = -0.0
    assert top_indices_triton(zeros, 10).tolist() == [list(range(10))]
    assert top_indices_triton(zeros, 0).shape == (1, 0)
    with pytest.raises(ValueError, match="0 <= n <= 3000"):
        top_indices_triton(zeros, 3001)


@pytest.mark.skipif(DEVICE != "cuda", reason="needs 17 GB of GPU memory")
def test_sparse_decode_reads_keys_past_two_to_the_31_elements():
    """Batch row 1 of K starts past 2^31 elements: its offsets must be 64-bit."""
    n, d = 2**24 + 64, 128
    k = torch.empty(2, 1, n, d, dtype=torch.bfloat16, device="cuda").normal_()
    v = torch.empty_like(k).normal_()
    q = torch.randn(2, 1, 1, d, dtype=torch.bfloat16, device="cuda")
    tokens = torch.stack([torch.arange(n - 100, n, device="cuda")] * 2)[:, None].int()
    q_last = torch.full((2,), n - 1, dtype=torch.int32, device="cuda")
    out = sparse_decode_triton(q, k, v, tokens, q_last, None, d**-0.5)
    ks, vs = k[:, :, n - 100 :].float(), v[:, :, n - 100 :].float()
    want = torch.softmax(q.float() @ ks.transpose(-1, -2) * d**-0.5, -1) @ vs
    torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)
