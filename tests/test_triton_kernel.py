"""The Triton kernel against the op's PyTorch reference (interpreter on CPU; compiled on GPU)."""

import math

import pytest
import torch
from attention_cases import CASES, golden, make_case

from sparsecomp.kernels import build_block_index, index_positions, sparse_attention_reference
from sparsecomp.kernels.block_sparse_attention import sparse_attention_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter's bf16 dot multiplies raw bit patterns: bf16 is tested on the GPU only.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def run_both(case, dtype, softcap=0.0, positions=None):
    b, hq, hkv, nq, nk, d, block, causal, window, sinks, windows, pad = case
    q, k, v, key_ok = (t.to(DEVICE) if t is not None else None for t in make_case(b, hq, hkv, nq, nk, d, dtype, pad))
    q_pos, k_pos = positions or (index_positions(q, 2), index_positions(k, 2))
    sink = torch.tensor(sinks, dtype=torch.int32, device=DEVICE)
    win = torch.tensor(windows, dtype=torch.int32, device=DEVICE)
    index = build_block_index(
        q_pos, k_pos, key_ok, sink, win, causal=causal, window=window, block_m=block, block_n=block, max_blocks=None
    )
    args = (q, k, v, q_pos, k_pos, key_ok, *index, sink, win, 1 / math.sqrt(d), causal, window, softcap, block, block)
    poisoned = torch.full((b, hq, nq, d), float("nan"), dtype=dtype, device=DEVICE)
    out = sparse_attention_triton(*args, out=poisoned)
    return out, sparse_attention_reference(*args), (q, k, v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_reference(case, dtype):
    out, ref, _ = run_both(case, dtype)
    assert torch.isfinite(out).all()  # every element written, no NaN from empty rows
    tol = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def test_kernel_softcap_and_head_dims_that_are_not_powers_of_two():
    case = (1, 4, 2, 45, 45, 24, 16, True, 0, [2, 0, 2, 0], [8, 0, 8, 0], 0)
    out, ref, _ = run_both(case, torch.float32, softcap=3.0)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_kernel_positions_from_a_tensor_and_larger_key_blocks():
    """Query positions offset by 5 (a chunk after cached keys), index blocks of 32 keys."""
    nq, nk = 27, 32
    q_pos = (torch.arange(nq, device=DEVICE) + 5)[None]
    k_pos = torch.arange(nk, device=DEVICE)[None]
    case = (2, 2, 1, nq, nk, 16, 32, True, 0, [1, 0], [6, 0], 0)
    out, ref, (q, k, v) = run_both(case, torch.float32, positions=(q_pos, k_pos))
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    keep = (k_pos[0][None, :] <= q_pos[0][:, None]).expand(2, 2, nq, nk).clone()
    local = (q_pos[0][:, None] - k_pos[0][None, :] < 6) | (k_pos[0][None, :] < 1)
    keep[:, 0] &= local
    torch.testing.assert_close(out.double().cpu(), golden(q, k, v, keep, 0.25).cpu(), atol=1e-5, rtol=1e-5)
