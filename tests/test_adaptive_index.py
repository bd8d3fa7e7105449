"""Adaptive index builders (vertical-slash, SampleAttention, block top-k) against straightforward
dense references of the same definitions, the op end to end, and the recall metric."""

import math
from fractions import Fraction

import pytest
import torch
from attention_cases import assert_same_lists, golden, make_case

from sparsecomp.calibration.recall import pattern_recall
from sparsecomp.kernels import index_positions, sparse_attention_reference
from sparsecomp.kernels.prefill.adaptive_index import block_topk_index, sample_index, vertical_slash_index
from sparsecomp.kernels.prefill.block_sparse_attention import index_pairs, sparse_attention_triton, structure_pairs

B, HQ, HKV, N, D, BLOCK = 2, 4, 2, 150, 16, 16
SCALE = D**-0.5


def inputs(pad=0, seed=0, n=N):
    torch.manual_seed(seed)
    q, k, v, key_ok = make_case(B, HQ, HKV, n, n, D, torch.float32, pad=pad)
    return q * 2, k, v, key_ok, index_positions(q, 2), index_positions(k, 2)


def dense_attention(q, k, allowed):
    """Exact softmax attention (fp64) for every row: (B, Hq, Nq, Nk)."""
    kr = k.double().repeat_interleave(HQ // HKV, 1)
    s = (q.double() @ kr.transpose(-1, -2) * SCALE).masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0.0)


def top_positive(scores, forced, budget, mass=1.0):
    """Per head, the forced entries plus the ``budget[h]`` largest positive others, in descending
    order while the kept score (forced included) is short of ``mass`` of the total: a bool mask."""
    keep = forced.expand_as(scores).clone()
    for bb in range(scores.shape[0]):
        for h, kk in enumerate(budget):
            row, fixed = scores[bb, h], keep[bb, h].clone()
            free = row.masked_fill(fixed, 0)
            kept = row[fixed].sum()
            for rank, j in enumerate(free.argsort(descending=True).tolist()):
                if rank >= kk or free[j] <= 0 or (mass < 1 and kept >= mass * row.sum()):
                    break
                keep[bb, h, j], kept = True, kept + free[j]
    return keep


def blocks_to_pairs(block_sel, n_q, n_k):
    return block_sel.repeat_interleave(BLOCK, -2)[..., :n_q, :].repeat_interleave(BLOCK, -1)[..., :n_k]


def vertical_slash_reference(q, k, key_ok, q_pos, k_pos, nv, ns, last_q, sink, local, mass=1.0):
    n = q.shape[2]
    allowed = structure_pairs(q_pos, k_pos, key_ok, causal=True, window=0)
    attn = dense_attention(q, k, allowed)[:, :, n - last_q :]
    vertical = attn.sum(2)
    offset = torch.arange(n - last_q, n)[:, None] - torch.arange(n)[None, :]
    slash = torch.stack([(attn * (offset == o)).sum((2, 3)) for o in range(n)], -1)
    start = key_ok.long().argmax(-1)[:, None, None] if key_ok is not None else 0
    sinks = ((torch.arange(n) - start < sink) & (torch.arange(n) >= start)).expand_as(vertical)
    local_offsets = (torch.arange(n) < local).expand_as(slash)
    cols = top_positive(vertical, sinks, nv, mass)
    offs = top_positive(slash, local_offsets, ns, mass)
    # a kept offset selects every block pair whose full BLOCK x BLOCK extent holds a pair (i, j)
    # with i - j at that offset (the last, partial blocks counted whole)
    n_b = -(-n // BLOCK)
    grid = torch.arange(n_b * BLOCK)
    pair_offset = grid[:, None] - grid[None, :]
    on_slash = offs[:, :, pair_offset.clamp(0, n - 1)] & (pair_offset >= 0) & (pair_offset < n)
    block_sel = on_slash.view(B, HQ, n_b, BLOCK, n_b, BLOCK).any(5).any(3)
    return (blocks_to_pairs(block_sel, n, n) | cols[:, :, None, :]) & allowed


def exact_ceil(ratio: float, n: int) -> int:
    """ceil(ratio * n) with the ratio as a fraction (0.2 * 150 in floats is 30.000000000000004)."""
    return math.ceil(Fraction(ratio).limit_denominator(1 << 16) * n)


def sample_reference(q, k, key_ok, q_pos, k_pos, alpha, window_ratio, sample_ratio):
    n = q.shape[2]
    allowed = structure_pairs(q_pos, k_pos, key_ok, causal=True, window=0)
    n_rows = exact_ceil(sample_ratio, n)
    rows = torch.tensor([n - 1 - m * n // n_rows for m in range(n_rows - 1, -1, -1)])
    score = dense_attention(q, k, allowed)[:, :, rows].sum(2)
    cols = torch.zeros_like(score, dtype=torch.bool)
    for bb in range(B):
        for h in range(HQ):
            total, acc = score[bb, h].sum(), 0.0
            for j in score[bb, h].argsort(descending=True).tolist():
                if acc >= alpha[h] * total or score[bb, h, j] <= 0:
                    break
                cols[bb, h, j], acc = True, acc + score[bb, h, j]
    w = exact_ceil(window_ratio, n)
    qb, kb = torch.arange(n)[:, None] // BLOCK, torch.arange(n)[None, :] // BLOCK
    band = (kb - qb >= math.floor(-w / BLOCK)) & (kb <= qb)
    return (band | cols[:, :, None, :]) & allowed


def block_topk_reference(q, k, key_ok, q_pos, k_pos, top_k):
    n = q.shape[2]
    n_b = -(-n // BLOCK)
    allowed = structure_pairs(q_pos, k_pos, key_ok, causal=True, window=0).expand(B, 1, n, n)
    ok = key_ok if key_ok is not None else torch.ones(B, n, dtype=torch.bool)
    kr = k.repeat_interleave(HQ // HKV, 1)
    sel = torch.zeros(B, HQ, n_b, n_b, dtype=torch.bool)
    for bb in range(B):
        for h in range(HQ):
            for i in range(n_b):
                qm = q[bb, h, i * BLOCK : (i + 1) * BLOCK].mean(0)
                visible = [
                    j
                    for j in range(n_b)
                    if allowed[bb, 0, i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK].any()
                ]
                if not visible:
                    continue
                forced = {visible[0]} | {j for j in visible if j >= i}
                scores = {}
                for j in set(visible) - forced:
                    keys = kr[bb, h, j * BLOCK : (j + 1) * BLOCK][ok[bb, j * BLOCK : (j + 1) * BLOCK]]
                    scores[j] = (qm @ keys.mean(0)).item()
                best = sorted(scores, key=scores.get, reverse=True)[: top_k[h]]
                for j in forced | set(best):
                    sel[bb, h, i, j] = True
    return blocks_to_pairs(sel, n, n) & allowed


def index_keep(index, q_pos, k_pos, key_ok, n):
    zeros = torch.zeros(HQ, dtype=torch.int32)
    rows = index_pairs(
        q_pos, k_pos, key_ok, *index[:4], index.columns, index.column_count, zeros, zeros,
        causal=True, window=0, block_m=BLOCK, block_n=BLOCK,
    )  # fmt: skip
    return rows(0, n).expand(B, HQ, n, n)


VS_BUDGETS, ALPHAS, TOP_K = ([9, 3, 20, 1], [4, 30, 2, 8]), [0.5, 0.9, 0.95, 0.3], [1, 2, 0, 4]


def build_index(pattern, q, k, key_ok, q_pos, k_pos):
    common = dict(scale=SCALE, causal=True, window=0, block_m=BLOCK, block_n=BLOCK)
    if pattern == "vertical_slash":
        return vertical_slash_index(q, k, q_pos, k_pos, key_ok, *VS_BUDGETS, last_q=20, sink=2, local=3, **common)
    if pattern == "sample":
        return sample_index(q, k, q_pos, k_pos, key_ok, ALPHAS, window_ratio=0.1, sample_ratio=0.2, **common)
    return block_topk_index(q, k, q_pos, k_pos, key_ok, TOP_K, coverage=0.0, pool="mean", **common)


def build(pattern, q, k, key_ok, q_pos, k_pos):
    """The builder's index and the dense reference mask of the same words."""
    index = build_index(pattern, q, k, key_ok, q_pos, k_pos)
    if pattern == "vertical_slash":
        ref = vertical_slash_reference(q, k, key_ok, q_pos, k_pos, *VS_BUDGETS, last_q=20, sink=2, local=3)
    elif pattern == "sample":
        ref = sample_reference(q, k, key_ok, q_pos, k_pos, ALPHAS, 0.1, 0.2)
    else:
        ref = block_topk_reference(q, k, key_ok, q_pos, k_pos, TOP_K)
    return index, ref


PATTERNS = ["vertical_slash", "sample", "block_topk"]


@pytest.mark.parametrize("pad", [0, 7])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_index_builder_matches_dense_reference(pattern, pad):
    q, k, v, key_ok, q_pos, k_pos = inputs(pad=pad, seed=len(pattern) + pad)
    index, ref = build(pattern, q, k, key_ok, q_pos, k_pos)
    kept = index_keep(index, q_pos, k_pos, key_ok, N)
    assert kept.any() and not kept.all()
    assert torch.equal(kept, ref), (kept != ref).sum().item()


def test_one_budget_for_every_head_matches_the_reference():
    """Uniform budgets take the scalar path (no per-head tensor): same masks as the reference."""
    q, k, v, key_ok, q_pos, k_pos = inputs(pad=3, seed=5)
    common = dict(scale=SCALE, causal=True, window=0, block_m=BLOCK, block_n=BLOCK)
    index = block_topk_index(q, k, q_pos, k_pos, key_ok, 2, coverage=0.0, pool="mean", **common)
    ref = block_topk_reference(q, k, key_ok, q_pos, k_pos, [2] * HQ)
    assert torch.equal(index_keep(index, q_pos, k_pos, key_ok, N), ref)
    index = vertical_slash_index(q, k, q_pos, k_pos, key_ok, 6, 5, last_q=20, sink=2, local=3, **common)
    ref = vertical_slash_reference(q, k, key_ok, q_pos, k_pos, [6] * HQ, [5] * HQ, last_q=20, sink=2, local=3)
    assert torch.equal(index_keep(index, q_pos, k_pos, key_ok, N), ref)


def test_vertical_slash_mass_cut_matches_reference_and_keeps_less():
    """FlexPrefill's cumulative cut under MInference's budgets: same words as the reference, and
    fewer pairs than the budgets alone."""
    q, k, v, key_ok, q_pos, k_pos = inputs(pad=4, seed=9)
    common = dict(scale=SCALE, causal=True, window=0, block_m=BLOCK, block_n=BLOCK)
    kept = {}
    for mass in (1.0, 0.1):
        index = vertical_slash_index(
            q, k, q_pos, k_pos, key_ok, 12, 10, last_q=20, sink=2, local=3, mass=mass, **common
        )
        kept[mass] = index_keep(index, q_pos, k_pos, key_ok, N)
        ref = vertical_slash_reference(q, k, key_ok, q_pos, k_pos, [12] * HQ, [10] * HQ, 20, 2, 3, mass=mass)
        assert torch.equal(kept[mass], ref), (kept[mass] != ref).sum().item()
    assert kept[0.1].sum() < kept[1.0].sum() and (kept[1.0] | ~kept[0.1]).all()


@pytest.mark.parametrize("pattern", PATTERNS)
def test_builder_traces_as_one_graph_under_dynamic_shapes(pattern):
    """A dynamic compile (every dim symbolic, as the cost model's fit compiles builders) traces each
    builder whole, with no graph break, and gives the eager index. A break left the builder running
    as pieces plus eager ops: host-bound, ~2 ms per call on the H100."""
    torch._dynamo.reset()
    q, k, v, key_ok, q_pos, k_pos = inputs(pad=0, seed=3)
    compiled = torch.compile(build_index, backend="eager", dynamic=True, fullgraph=True)
    index, expected = compiled(pattern, q, k, key_ok, q_pos, k_pos), build_index(pattern, q, k, key_ok, q_pos, k_pos)
    assert_same_lists(index, expected)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_op_on_an_adaptive_index_matches_golden(pattern):
    """Reference op and Triton kernel (interpreter on CPU) equal fp64 attention on the reference mask."""
    q, k, v, key_ok, q_pos, k_pos = inputs(pad=5, seed=11)
    index, ref_mask = build(pattern, q, k, key_ok, q_pos, k_pos)
    zeros = torch.zeros(HQ, dtype=torch.int32)
    args = (q, k, v, q_pos, k_pos, key_ok, *index.tensors, zeros, zeros, SCALE, True, 0, 0.0, BLOCK, BLOCK)
    expected = golden(q, k, v, ref_mask, SCALE).float()
    torch.testing.assert_close(sparse_attention_reference(*args), expected, atol=2e-5, rtol=2e-5)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    on = [t.to(dev) if isinstance(t, torch.Tensor) else t for t in args]
    out = sparse_attention_triton(*on, out=torch.full_like(on[0], float("nan")))
    torch.testing.assert_close(out.cpu(), expected, atol=2e-5, rtol=2e-5)


def test_block_topk_coverage_and_minmax_bounds_keep_more_as_asked():
    q, k, v, key_ok, q_pos, k_pos = inputs(seed=3)
    common = dict(scale=SCALE, causal=True, window=0, block_m=BLOCK, block_n=BLOCK)
    zeros = torch.zeros(HQ, dtype=torch.int32)
    densities = []
    for coverage in (0.3, 0.9):
        index = block_topk_index(q, k, q_pos, k_pos, key_ok, 1, coverage=coverage, pool="minmax", **common)
        r = pattern_recall(q, k, v, index, q_pos, k_pos, key_ok, zeros, zeros, causal=True, window=0,
                           block_m=BLOCK, block_n=BLOCK, scale=SCALE)  # fmt: skip
        densities.append(r.density.mean().item())
    assert densities[0] < densities[1] < 1.0


def test_recall_metric():
    """Dense keeps everything (cra 1, no error); a pattern's cra equals the dense mass on its mask;
    chunking does not change the numbers."""
    import sparsecomp.calibration.recall as recall

    q, k, v, key_ok, q_pos, k_pos = inputs(pad=4, seed=5)
    zeros = torch.zeros(HQ, dtype=torch.int32)
    common = dict(causal=True, window=0, block_m=BLOCK, block_n=BLOCK, scale=SCALE)
    alpha = [0.5] * HQ
    index = sample_index(q, k, q_pos, k_pos, key_ok, alpha, window_ratio=0.05, sample_ratio=0.1, **common)
    r = pattern_recall(q, k, v, index, q_pos, k_pos, key_ok, zeros, zeros, **common)
    mask = index_keep(index, q_pos, k_pos, key_ok, N)
    allowed = structure_pairs(q_pos, k_pos, key_ok, causal=True, window=0)
    p = dense_attention(q, k, allowed)
    seen = allowed.any(-1).expand(B, HQ, N)
    cra = ((p * mask).sum(-1) * seen).sum((0, 2)) / seen.sum((0, 2))
    torch.testing.assert_close(r.cra.double(), cra, atol=1e-5, rtol=1e-5)
    assert (r.density < 1).all() and (r.out_err > 0).all()
    old = recall._CHUNK_ELEMENTS
    recall._CHUNK_ELEMENTS = B * HQ * N * 7  # chunks of 7 rows
    try:
        r7 = pattern_recall(q, k, v, index, q_pos, k_pos, key_ok, zeros, zeros, **common)
    finally:
        recall._CHUNK_ELEMENTS = old
    for a, b_ in ((r.cra, r7.cra), (r.density, r7.density), (r.out_err, r7.out_err)):
        torch.testing.assert_close(a, b_, atol=1e-5, rtol=1e-4)
    index = block_topk_index(q, k, q_pos, k_pos, key_ok, 100, coverage=0.0, pool="mean", **common)
    full = pattern_recall(q, k, v, index, q_pos, k_pos, key_ok, zeros, zeros, **common)
    torch.testing.assert_close(full.cra, torch.ones(HQ), atol=1e-5, rtol=0)
    assert full.out_err.max() < 1e-5 and torch.equal(full.density, torch.ones(HQ))
