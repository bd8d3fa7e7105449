"""The granularity benchmark's density formulas against brute force on small random selections (CPU)."""

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from vertical_slash_granularity import element_density, range_density  # noqa: E402


def random_selection(n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.rand(1, 2, n, generator=gen) < 0.08
    offsets[..., :3] = True  # the local diagonals, as the builder forces them
    cols = torch.rand(1, 2, n, generator=gen) < 0.05
    return offsets, cols


@pytest.mark.parametrize("n", [1, 37, 150])
def test_element_density_counts_each_kept_pair_once(n):
    offsets, cols = random_selection(n, seed=n)
    r = torch.arange(n)[:, None]
    c = torch.arange(n)[None, :]
    for h in range(2):
        diff = (r - c).clamp_min(0)
        kept = (c <= r) & (offsets[0, h][diff] | cols[0, h][c])
        expected = kept.sum().item() / (n * (n + 1) / 2)
        assert element_density(offsets, cols)[0, h].item() == pytest.approx(expected)


@pytest.mark.parametrize("n, g", [(1, 16), (150, 16), (203, 32)])
def test_range_density_matches_merged_key_ranges(n, g):
    offsets, cols = random_selection(n, seed=n + g)
    for h in range(2):
        tiles = 0
        for q0 in range(0, n, g):
            covered = torch.zeros(n + g, dtype=torch.bool)  # keys of the query block's slash ranges
            for o in offsets[0, h].nonzero().flatten().tolist():
                lo, hi = max(0, q0 - o), q0 + g - 1 - o
                if hi >= 0:
                    covered[lo : hi + 1] = True
            run = 0
            for x in covered.tolist() + [False]:  # each contiguous range walked g keys at a time
                if x:
                    run += 1
                else:
                    tiles += math.ceil(run / g)
                    run = 0
            tiles += math.ceil(cols[0, h][: q0 + g].sum().item() / g)
        expected = tiles * g * g / (n * (n + 1) / 2)
        assert range_density(offsets, cols, g)[0, h].item() == pytest.approx(expected)
