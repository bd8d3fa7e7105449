"""The op's PyTorch reference and the index builder against a plain dense masked golden (fp64)."""

import math

import pytest
import torch
from attention_cases import CASES, add_random_columns, case_setup, column_membership, golden, make_case

from sparsecomp.kernels import (
    block_index_bound,
    build_block_index,
    index_positions,
    sparse_attention_call,
    sparse_attention_reference,
)
from sparsecomp.kernels.prefill.block_sparse_attention import local_pairs, structure_pairs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_reference_matches_dense_golden(case, dtype):
    b, hq, hkv, nq, nk, d, block, causal, window, sinks, windows, pad = case
    (q, k, v, q_pos, k_pos, key_ok, sink, win), index, keep = case_setup(case, dtype)
    scale = 1 / math.sqrt(d)
    structure = dict(q_pos=q_pos, k_pos=k_pos, key_ok=key_ok, scale=scale, causal=causal, window=window)
    out = sparse_attention_call(q, k, v, index, head_sink=sink, head_window=win, **structure)
    ref = golden(q, k, v, keep, scale)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    # Rows with no kept key are zeros (left-padded query rows under causal masks).
    empty = ~keep.any(-1)
    assert (out[empty] == 0).all()


@pytest.mark.parametrize("case", CASES)
def test_index_is_exact(case):
    """Full blocks keep every pair; no kept pair lies outside the listed blocks."""
    b, hq, hkv, nq, nk, d, block, causal, window, sinks, windows, pad = case
    bound = block_index_bound(
        sinks, windows, causal=causal, window=window, block_m=block, block_n=block, positions_are_indices=True
    )
    _, index, keep = case_setup(case, max_blocks=bound)
    fb, fc, pb, pc = index[:4]
    n_qb, n_kb = -(-nq // block), -(-nk // block)
    padded = torch.zeros(b, hq, n_qb * block, n_kb * block, dtype=torch.bool)
    padded[..., :nq, :nk] = keep
    blocks = padded.view(b, hq, n_qb, block, n_kb, block)
    kept_any = blocks.any(-1).any(-2)  # (B, H, nQB, nKB)
    inside = torch.zeros(b, hq, n_qb * block, n_kb * block, dtype=torch.bool)
    inside[..., :nq, :nk] = True
    kept_all = (blocks | ~inside.view_as(blocks)).all(-1).all(-2)  # ignoring positions past N
    fb, fc, pb, pc = (t.expand(b, hq, *t.shape[2:]) for t in (fb, fc, pb, pc))
    for bi in range(b):
        for h in range(hq):
            for qb in range(n_qb):
                full = set(fb[bi, h, qb, : fc[bi, h, qb]].tolist())
                part = set(pb[bi, h, qb, : pc[bi, h, qb]].tolist())
                assert not full & part
                needed = set(torch.nonzero(kept_any[bi, h, qb]).flatten().tolist())
                assert needed <= full | part, (bi, h, qb)
                for kb in full:
                    assert kept_all[bi, h, qb, kb] and kb * block + block <= nk


def test_reference_softcap_and_errors():
    q, k, v, _ = make_case(1, 2, 1, 20, 20, 16, torch.float32)
    q_pos = k_pos = torch.arange(20)[None]
    zeros = torch.zeros(2, dtype=torch.int32)
    index = build_block_index(
        q_pos, k_pos, None, zeros, zeros, causal=True, window=0, block_m=16, block_n=16, max_blocks=None
    )
    out = sparse_attention_reference(
        q * 4, k, v, q_pos, k_pos, None, *index.tensors, zeros, zeros, 0.5, True, 0, 5.0, 16, 16
    )
    keep = torch.ones(20, 20, dtype=torch.bool).tril()[None, None].expand(1, 2, 20, 20)
    torch.testing.assert_close(out.double(), golden(q * 4, k, v, keep, 0.5, softcap=5.0), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="head_dim=12"):
        q12 = torch.randn(1, 2, 20, 12)
        k12 = torch.randn(1, 1, 20, 12)
        sparse_attention_reference(
            q12, k12, k12, q_pos, k_pos, None, *index.tensors, zeros, zeros, 1.0, True, 0, 0.0, 16, 16
        )
    with pytest.raises(ValueError, match="multiple of KV heads"):
        sparse_attention_reference(
            q,
            torch.randn(1, 3, 20, 16),
            torch.randn(1, 3, 20, 16),
            q_pos,
            k_pos,
            None,
            *index.tensors,
            zeros,
            zeros,
            1.0,
            True,
            0,
            0.0,
            16,
            16,
        )


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_index_builder_compiles_to_the_same_index(device):
    """The builder runs inside compiled graphs: Inductor must give the index eager gives (on the
    GPU it once did not: a padding constant of 2**40 wrapped to 0)."""
    b, nq, nk, block = 2, 100, 100, 16
    key_ok = torch.ones(b, nk, dtype=torch.bool, device=device)
    key_ok[1, :9] = False
    q_pos, k_pos = torch.arange(nq, device=device)[None], torch.arange(nk, device=device)[None]
    sink = torch.tensor([3, 0], dtype=torch.int32, device=device)
    win = torch.tensor([20, 0], dtype=torch.int32, device=device)
    kwargs = dict(causal=True, window=0, block_m=block, block_n=block, max_blocks=None)
    eager = build_block_index(q_pos, k_pos, key_ok, sink, win, **kwargs)
    compiled = torch.compile(build_block_index, backend="inductor", fullgraph=True)(
        q_pos, k_pos, key_ok, sink, win, **kwargs
    )
    for e, c in zip(eager[:4], compiled[:4], strict=True):
        torch.testing.assert_close(c, e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reference_with_columns_matches_golden(dtype):
    """Sink + window blocks plus single key columns (vertical stripes) per query block."""
    b, hq, hkv, n, d, block = 2, 4, 2, 90, 16, 16
    q, k, v, key_ok = make_case(b, hq, hkv, n, n, d, dtype, pad=5)
    q_pos, k_pos = index_positions(q, 2), index_positions(k, 2)
    sink, win = torch.tensor([2, 0, 2, 4], dtype=torch.int32), torch.tensor([10, 0, 20, 12], dtype=torch.int32)
    index = build_block_index(
        q_pos, k_pos, key_ok, sink, win, causal=True, window=0, block_m=block, block_n=block, max_blocks=None
    )
    index = add_random_columns(index, n, block, per_query_block=7)
    out = sparse_attention_call(
        q,
        k,
        v,
        index,
        q_pos=q_pos,
        k_pos=k_pos,
        key_ok=key_ok,
        head_sink=sink,
        head_window=win,
        scale=0.25,
        causal=True,
    )
    start = key_ok.int().argmax(-1)
    structure = structure_pairs(q_pos, k_pos, key_ok, causal=True, window=0)
    local = local_pairs(q_pos, k_pos, start, sink, win)
    keep = (structure & (local | column_membership(index, n, n, block))).expand(b, hq, n, n)
    torch.testing.assert_close(out.double(), golden(q, k, v, keep, 0.25), atol=2e-3, rtol=2e-3)
    assert index.column_count.sum() > 0


def test_columns_inside_listed_blocks_are_refused():
    q, k, v, _ = make_case(1, 2, 1, 40, 40, 16, torch.float32)
    q_pos, k_pos = index_positions(q, 2), index_positions(k, 2)
    zeros = torch.zeros(2, dtype=torch.int32)
    index = build_block_index(
        q_pos, k_pos, None, zeros, zeros, causal=True, window=0, block_m=16, block_n=16, max_blocks=None
    )
    cols = torch.zeros(1, 1, 3, 1, dtype=torch.int32)  # key 0 is in block 0, which every query block lists
    index = index._replace(columns=cols, column_count=torch.ones(1, 1, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="inside a listed block"):
        sparse_attention_reference(
            q, k, v, q_pos, k_pos, None, *index.tensors, zeros, zeros, 0.25, True, 0, 0.0, 16, 16
        )
