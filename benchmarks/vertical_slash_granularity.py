"""How much of the vertical-slash pattern a tile kernel must compute, by lowering: why MInference's
budget (1000 verticals, 6096 slashes) is far from dense-free at 128K on inputs whose slashes spread.

For the same kept columns and slash offsets (``vertical_slash_selection``, prefill, causal), the
fraction of the causal pairs computed when lowered
  - element: the kept pairs themselves (no kernel computes fewer);
  - ranges g: MInference's lowering: per query block of g rows, each kept offset o covers the keys
    [q0 - o, q0 + g - 1 - o]; overlapping ranges merge and each merged range is walked g keys at a
    time (unaligned tiles), kept columns gathered g at a time (an upper bound: columns inside a
    range are counted again);
  - blocks b: ours: aligned b x b blocks on every block diagonal that holds a kept offset, plus
    column tiles (the index the kernel runs).
1 / density bounds the speedup over dense attention at equal throughput.

    python benchmarks/vertical_slash_granularity.py --lengths 131072 524288 --inputs smollm2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import environment, markdown_table, write_results  # noqa: E402

from sparsecomp.kernels import index_positions  # noqa: E402
from sparsecomp.kernels.prefill.adaptive_index import vertical_slash_index, vertical_slash_selection  # noqa: E402


def causal_pairs(n: int) -> float:
    return n * (n + 1) / 2


def element_density(offsets_kept: torch.Tensor, cols_kept: torch.Tensor) -> torch.Tensor:
    """Kept pairs / causal pairs per (batch, head), for Nq = Nk = N. Offset o keeps rows o..N-1
    (N - o pairs), column v keeps rows v..N-1; a pair on both (r - v = o) is counted once."""
    n = offsets_kept.shape[-1]
    rows_after = n - torch.arange(n, device=offsets_kept.device, dtype=torch.float64)
    slash_pairs = (offsets_kept * rows_after).sum(-1)
    column_pairs = (cols_kept * rows_after).sum(-1)
    offsets_upto = torch.cumsum(offsets_kept.double(), -1)  # [x] = kept offsets <= x
    both = (cols_kept * offsets_upto.flip(-1)).sum(-1)  # column v meets offsets o <= N - 1 - v
    return (slash_pairs + column_pairs - both) / causal_pairs(n)


def range_density(offsets_kept: torch.Tensor, cols_kept: torch.Tensor, g: int) -> torch.Tensor:
    """Computed pairs / causal pairs per (batch, head) under MInference's lowering (module notes)."""
    n = offsets_kept.shape[-1]
    out = torch.empty(offsets_kept.shape[:-1], dtype=torch.float64)
    q0 = torch.arange(0, n, g, device=offsets_kept.device)
    for i in range(offsets_kept.shape[0]):
        for h in range(offsets_kept.shape[1]):
            o = offsets_kept[i, h].nonzero().flatten()  # ascending
            new_run = torch.ones_like(o, dtype=torch.bool)
            new_run[1:] = (o[1:] - o[:-1]) > g
            starts = new_run.nonzero().flatten()
            ends = torch.cat([starts[1:] - 1, starts.new_tensor([len(o) - 1])]) if len(o) else starts
            o_lo, o_hi = o[starts], o[ends]  # each merged run of offsets covers one key range
            top = q0[:, None] + g - 1 - o_lo[None, :]  # last key of the range
            bottom = (q0[:, None] - o_hi[None, :]).clamp_min(0)
            length = (top - bottom + 1).clamp_min(0)
            slash_tiles = (-(-length // g)).sum()
            cols_upto = torch.cumsum(cols_kept[i, h].long(), 0)
            col_tiles = (-(-cols_upto[(q0 + g - 1).clamp_max(n - 1)] // g)).sum()
            out[i, h] = float(slash_tiles + col_tiles) * g * g / causal_pairs(n)
    return out


def index_density(index, n: int, block: int) -> torch.Tensor:
    """Computed pairs / causal pairs per (batch, head) of our index: listed blocks of block x block
    and gathered column tiles of ``block`` keys."""
    blocks = (index.full_count.sum(-1) + index.part_count.sum(-1)).double()
    if index.columns is not None:
        blocks = blocks + (-(-index.column_count // block)).sum(-1).double()
    return (blocks * block * block / causal_pairs(n)).cpu()


def analyse(n: int, locality: str, budget=(1000, 6096), last_q: int = 64) -> list[dict]:
    from prefill_patterns import HQ, SCALE, structured_qkv  # here: the density formulas load without it

    q, k, _ = structured_qkv(n, seed=n, locality=locality)
    pos = index_positions(q, 2)
    common = dict(last_q=last_q, sink=64, local=64, scale=SCALE, causal=True, window=0)
    cols, offsets = vertical_slash_selection(q, k, pos, pos, None, *budget, **common)
    rows = [{"lowering": "element (kept pairs)", "density": element_density(offsets, cols).mean().item()}]
    for g in (64, 128):
        density = range_density(offsets, cols, g).mean().item()
        rows.append({"lowering": f"ranges of {g} (MInference)", "density": density})
    for b in (64, 128):
        index = vertical_slash_index(q, k, pos, pos, None, *budget, block_m=b, block_n=b, **common)
        rows.append({"lowering": f"blocks of {b} (ours)", "density": index_density(index, n, b).mean().item()})
    for row in rows:
        row.update(N=n, inputs=locality, heads=HQ, bound=1 / row["density"])
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072, 524288])
    p.add_argument("--inputs", nargs="+", default=["smollm2", "strong"])
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    columns = [
        ("N", "N", ""),
        ("inputs", "inputs", ""),
        ("lowering", "lowering", ""),
        ("density", "computed / causal pairs", ".3f"),
        ("bound", "speedup bound (1 / density)", ".1f"),
    ]
    rows = []
    for n in args.lengths:
        for locality in args.inputs:
            rows += analyse(n, locality)
            print(markdown_table(rows[-5:], columns), flush=True)
    write_results(Path(args.out), "vertical_slash_granularity", environment(), rows, markdown_table(rows, columns))


if __name__ == "__main__":
    main()
