"""Top-n selection on the GPU: torch.topk against our radix selection (``kernels/decode/top_select.py``)
over the row shapes decode steps rank, n = N / 16 of each row's N scores.

Rows: 8 (batch 1, 8 KV heads) and 64 (batch 8) of 8K (Quest's pages at 128K keys) to 512K
(Double Sparsity's keys) fp32 scores, random normal with every 11th masked (-inf, as padding is).
Per shape: torch.topk (unsorted, fp32, and on the scores cast to bf16, for reference), the radix
selection at each chunk size (keys per program), and whether it picks torch.topk's keys. Medians
of CUDA-graph replays (benchmarks/harness.py). What decides ``top_tokens``' default.

    python benchmarks/top_select.py --out DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import environment, markdown_table, median_ms, write_results  # noqa: E402

from sparsecomp.kernels.decode.top_select import top_indices_triton  # noqa: E402

CHUNKS = (512, 1024, 2048, 4096)
COLUMNS = [
    ("rows", "rows", ""), ("n_keys", "N", ""), ("n_pick", "n", ""),
    ("torch_topk_ms", "torch.topk ms", ".4f"), ("torch_topk_bf16_ms", "torch.topk bf16 ms", ".4f"),
    *((f"radix_{c}_ms", f"radix chunk {c} ms", ".4f") for c in CHUNKS),
    ("radix_best_x", "torch.topk / best radix", ".2f"), ("same_keys", "same keys", ""),
]  # fmt: skip


def measure(n_rows: int, n_keys: int) -> dict:
    n = n_keys // 16
    scores = torch.randn(n_rows, n_keys, device="cuda")
    scores[:, 5::11] = float("-inf")
    expected = torch.topk(scores, n, dim=-1, sorted=False).indices.sort(-1).values
    row = {"rows": n_rows, "n_keys": n_keys, "n_pick": n}
    row["torch_topk_ms"] = median_ms(lambda: torch.topk(scores, n, dim=-1, sorted=False))
    as_bf16 = scores.bfloat16()
    row["torch_topk_bf16_ms"] = median_ms(lambda: torch.topk(as_bf16, n, dim=-1, sorted=False))
    same = True
    for chunk in CHUNKS:
        got = top_indices_triton(scores, n, chunk)
        same &= torch.equal(got.long().sort(-1).values, expected)
        row[f"radix_{chunk}_ms"] = median_ms(lambda c=chunk: top_indices_triton(scores, n, c))
    row["radix_best_x"] = row["torch_topk_ms"] / min(row[f"radix_{c}_ms"] for c in CHUNKS)
    row["same_keys"] = same
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[8, 64])
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072, 524288])
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    rows = []
    for n_rows in args.rows:
        for n_keys in args.lengths:
            rows.append(measure(n_rows, n_keys))
            print(rows[-1], flush=True)
            write_results(Path(args.out), "top_select", environment(), rows, markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
