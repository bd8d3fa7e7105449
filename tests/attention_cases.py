"""Shared attention test cases and the fp64 dense golden (imported by the kernel tests)."""

import torch


def golden(q, k, v, keep, scale, softcap=0.0):
    """fp64 dense attention with an explicit (B, H, Nq, Nk) keep mask; empty rows give zeros."""
    g = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = q.double() @ k.transpose(-1, -2) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v


def make_case(b, hq, hkv, nq, nk, d, dtype, pad=0):
    q = torch.randn(b, hq, nq, d, dtype=dtype)
    k = torch.randn(b, hkv, nk, d, dtype=dtype)
    v = torch.randn(b, hkv, nk, d, dtype=dtype)
    key_ok = None
    if pad:
        key_ok = torch.ones(b, nk, dtype=torch.bool)
        key_ok[-1, :pad] = False  # left padding on the last row
    return q, k, v, key_ok


CASES = [  # (B, Hq, Hkv, Nq, Nk, D, block, causal, window, sinks, windows, pad)
    (1, 2, 1, 1, 1, 16, 16, True, 0, [0, 0], [0, 0], 0),
    (1, 4, 2, 63, 63, 16, 16, True, 0, [0, 4, 0, 2], [0, 8, 0, 20], 0),
    (2, 4, 1, 100, 100, 32, 16, True, 0, [3, 3, 3, 3], [17, 17, 40, 5], 7),
    (2, 2, 2, 57, 57, 24, 16, True, 12, [0, 2], [0, 5], 3),
    (1, 6, 3, 40, 40, 16, 16, False, 0, [0] * 6, [0] * 6, 0),
    (2, 2, 1, 257, 257, 16, 32, True, 0, [16, 0], [64, 0], 30),
]


def add_random_columns(index, n_k: int, block_n: int, per_query_block: int, seed: int = 0):
    """The index with up to ``per_query_block`` random single key columns per (batch, head, query
    block), chosen outside that query block's listed blocks (the index invariant), ascending."""
    fb, fc, pb, pc = index[:4]
    n_kb = -(-n_k // block_n)
    slot = torch.arange(fb.shape[-1])
    listed = torch.zeros(*fb.shape[:3], n_kb + 1, dtype=torch.bool)
    for blocks, count in ((fb, fc), (pb, pc)):
        ids = torch.where(slot < count[..., None], blocks.long(), n_kb)
        listed.scatter_(-1, ids, True)
    key_listed = listed[..., :n_kb].repeat_interleave(block_n, -1)[..., :n_k]
    score = torch.rand(*key_listed.shape, generator=torch.Generator().manual_seed(seed))
    score[key_listed] = float("inf")
    k = min(per_query_block, n_k)
    best = score.topk(k, largest=False)
    count = torch.isfinite(best.values).sum(-1, dtype=torch.int32)
    cols = torch.where(torch.isfinite(best.values), best.indices, n_k).sort(-1).values.to(torch.int32)
    return index._replace(columns=cols.contiguous(), column_count=count)


def column_membership(index, n_q: int, n_k: int, block_m: int) -> torch.Tensor:
    """(B', H', Nq, Nk) bool: key j is a listed column for query i's block."""
    cols, count = index.columns.long(), index.column_count
    slot = torch.arange(cols.shape[-1])
    ids = torch.where(slot < count[..., None], cols, n_k)
    member = torch.zeros(*cols.shape[:3], n_k + 1, dtype=torch.bool).scatter_(-1, ids, True)[..., :n_k]
    return member.repeat_interleave(block_m, dim=2)[:, :, :n_q]


def case_setup(case, dtype=torch.float32, max_blocks=None):
    """Inputs, per-head rules, index and the kept-pair mask (B, Hq, Nq, Nk) of a CASES entry."""
    from sparsecomp.kernels import build_block_index, index_positions
    from sparsecomp.kernels.prefill.block_sparse_attention import kept_pairs

    b, hq, hkv, nq, nk, d, block, causal, window, sinks, windows, pad = case
    q, k, v, key_ok = make_case(b, hq, hkv, nq, nk, d, dtype, pad)
    q_pos, k_pos = index_positions(q, 2), index_positions(k, 2)
    sink, win = torch.tensor(sinks, dtype=torch.int32), torch.tensor(windows, dtype=torch.int32)
    index = build_block_index(
        q_pos,
        k_pos,
        key_ok,
        sink,
        win,
        causal=causal,
        window=window,
        block_m=block,
        block_n=block,
        max_blocks=max_blocks,
    )
    start = torch.zeros(1, dtype=torch.long) if key_ok is None else key_ok.int().argmax(-1)
    keep = kept_pairs(q_pos, k_pos, key_ok, start, sink, win, causal=causal, window=window).expand(b, hq, nq, nk)
    return (q, k, v, q_pos, k_pos, key_ok, sink, win), index, keep


def assert_same_lists(got, want):
    """Equal (full_blocks, full_count, part_blocks, part_count, ...): counts equal and each block list
    equal up to its count (the slots past it are unused and may hold anything); other parts equal."""
    from sparsecomp.kernels import SparseIndex

    if isinstance(want, SparseIndex):
        assert (got.block_m, got.block_n) == (want.block_m, want.block_n)
        got, want = got.tensors, want.tensors
    for lists, count in ((0, 1), (2, 3)):
        assert torch.equal(got[count].cpu(), want[count].cpu())
        used = torch.arange(want[lists].shape[-1], device=want[count].device) < want[count][..., None]
        assert got[lists].shape == want[lists].shape
        assert torch.equal(got[lists].cpu()[used.cpu()], want[lists].cpu()[used.cpu()])
    for g, w in zip(got[4:], want[4:], strict=True):
        assert (g is None and w is None) or torch.equal(g.cpu(), w.cpu())
