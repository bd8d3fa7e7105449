"""Column mass (attention per key summed over some rows): Triton passes vs reference vs an fp64 golden."""

import pytest
import torch
from attention_cases import make_case

from sparsecomp.kernels.prefill.block_sparse_attention import structure_pairs
from sparsecomp.kernels.prefill.column_mass import (
    column_mass,
    column_mass_reference,
    column_mass_triton,
    column_slash_mass,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])

CASES = [  # (B, Hq, Hkv, Nk, D, rows, causal, window, pad)
    (1, 2, 1, 1, 16, [0], True, 0, 0),
    (2, 4, 2, 150, 16, [0, 37, 38, 99, 149], True, 0, 9),  # padded rows see no key in batch 1
    (1, 6, 3, 200, 24, list(range(0, 200, 3)), True, 40, 0),  # head_dim padded, window
    (2, 2, 2, 97, 32, [5, 50, 96], False, 0, 4),
    (1, 4, 1, 300, 16, list(range(170, 300)), True, 0, 0),  # consecutive last rows (vertical-slash)
    (2, 4, 2, 100, 16, list(range(0, 64)), True, 0, 7),  # consecutive first rows, padding
    (1, 2, 2, 90, 16, list(range(21, 70)), False, 0, 0),  # consecutive middle rows, no causality
]


def rows_case(case, dtype):
    """(q_rows, k, row_pos, k_pos, key_ok, rows tensor) of a case: the listed rows of a prefill."""
    b, hq, hkv, nk, d, rows, causal, window, pad = case
    q, k, _, key_ok = make_case(b, hq, hkv, nk, nk, d, dtype, pad)
    q, k = q.to(DEVICE), k.to(DEVICE)
    key_ok = key_ok.to(DEVICE) if key_ok is not None else None
    rows_t = torch.tensor(rows, device=DEVICE)
    positions = torch.arange(nk, device=DEVICE)
    return q[:, :, rows_t], k, positions[rows_t][None], positions[None], key_ok, rows_t


def golden_mass(q_rows, k, row_pos, k_pos, key_ok, scale, causal, window):
    g = q_rows.shape[1] // k.shape[1]
    s = q_rows.double() @ k.double().repeat_interleave(g, 1).transpose(-1, -2) * scale
    keep = structure_pairs(row_pos, k_pos, key_ok, causal=causal, window=window)
    return torch.softmax(s.masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0).sum(2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_column_mass_matches_golden(case, dtype):
    b, hq, _, nk, d, rows, causal, window, _ = case
    q_rows, k, row_pos, k_pos, key_ok, rows_t = rows_case(case, dtype)
    args = (q_rows, k, row_pos, k_pos, key_ok, d**-0.5, causal, window)
    want = golden_mass(*args)
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}[dtype]
    small_tiles = dict(block_m=16, block_n=32, splits=3)  # several key splits and row tiles
    outs = (column_mass_triton(*args), column_mass_triton(*args, **small_tiles))
    for got in (*outs, column_mass_reference(*args), column_mass(*args)):
        assert got.shape == (b, hq, nk) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)
    # every row that sees a key gives it mass 1 in all
    keep = structure_pairs(row_pos, k_pos, key_ok, causal=causal, window=window).expand(-1, -1, len(rows), -1)
    sees = keep.any(-1).sum(-1)
    torch.testing.assert_close(want.sum(-1), sees.expand(b, hq).double(), atol=1e-9, rtol=0)


def golden_slash(q_rows, k, row_pos, k_pos, key_ok, row_index, scale, causal, window):
    g = q_rows.shape[1] // k.shape[1]
    s = q_rows.double() @ k.double().repeat_interleave(g, 1).transpose(-1, -2) * scale
    keep = structure_pairs(row_pos, k_pos, key_ok, causal=causal, window=window)
    p = torch.softmax(s.masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0)
    n_k = k.shape[2]
    slash = torch.zeros(*p.shape[:2], n_k, dtype=torch.float64, device=p.device)
    for r, row in enumerate(row_index.tolist()):
        for j in range(min(row, n_k - 1) + 1):  # pairs with key index <= the row's own
            slash[:, :, row - j] += p[:, :, r, j]
    return slash


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [c for c in CASES if c[5] == list(range(c[5][0], c[5][-1] + 1))])
def test_slash_mass_matches_golden(case, dtype):
    """Slash mass of consecutive rows (key index = row index here: prefill), with and without causality;
    small tiles put several row tiles and wrapped diagonals in one tile pair."""
    b, hq, _, nk, d, rows, causal, window, _ = case
    q_rows, k, row_pos, k_pos, key_ok, rows_t = rows_case(case, dtype)
    args = (q_rows, k, row_pos, k_pos, key_ok)
    want_cols = golden_mass(*args, d**-0.5, causal, window)
    want = golden_slash(*args, rows_t, d**-0.5, causal, window)
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}[dtype]
    first = rows[0]
    for cols, slash in (
        column_mass_triton(*args, d**-0.5, causal, window, first),
        column_mass_triton(*args, d**-0.5, causal, window, first, block_m=16, block_n=32, splits=2),
        column_mass_reference(*args, d**-0.5, causal, window, first),
        column_slash_mass(*args, first, d**-0.5, causal, window),
    ):
        torch.testing.assert_close(cols.double(), want_cols, atol=tol, rtol=tol)
        torch.testing.assert_close(slash.double(), want, atol=tol, rtol=tol)
