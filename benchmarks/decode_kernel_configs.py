"""Launch configurations of the decode kernels on this GPU: label scores (keys per program, warps)
and split-K attention (keys per tile, warps), and torch.topk on fp32 against fp16 scores, at the decode
benchmark's shapes (32 query / 8 KV heads, d=128, bf16, 1/16 of the keys selected). Medians of
CUDA-graph replays; the fastest configuration per shape is what the defaults should be.

    python benchmarks/decode_kernel_configs.py --lengths 131072 524288 --batches 1 8 --out DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import environment, markdown_table, median_ms, write_results  # noqa: E402

from sparsecomp.kernels.decode.selection import key_labels, label_scores_triton, query_channels, top_tokens  # noqa: E402
from sparsecomp.kernels.decode.sparse_decode import sparse_decode_triton  # noqa: E402

HQ, HKV, D, CHANNELS = 32, 8, 128, 16


def measure(b: int, n: int) -> list[dict]:
    dev = torch.device("cuda")
    q = torch.randn(b, HQ, 1, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(b, HKV, n, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q_last = torch.full((b,), n - 1, dtype=torch.int32, device=dev)
    channels = torch.stack([torch.randperm(D, device=dev)[:CHANNELS] for _ in range(HKV)])
    labels = key_labels(k, channels).contiguous()
    qc = query_channels(q, channels)
    rows = []
    for block_n in (128, 256, 512, 1024, 2048):
        for warps in (4, 8):

            def scores(bn=block_n, w=warps):
                return label_scores_triton(qc, labels, q_last, None, HKV, block_n=bn, num_warps=w)

            ms = median_ms(scores)
            rows.append({"batch": b, "kv_len": n, "kernel": "label_scores", "block_n": block_n, "warps": warps,
                         "ms": ms, "tb_s": labels.numel() * 2 / ms / 1e9})  # fmt: skip
    scores = label_scores_triton(qc, labels, q_last, None, HKV)
    s = n // 16
    for name, dtype in (("torch.topk fp32 scores", torch.float32), ("torch.topk fp16 scores", torch.float16)):
        typed = scores.to(dtype)
        rows.append({"batch": b, "kv_len": n, "kernel": name, "ms": median_ms(lambda t=typed: top_tokens(t, s))})
    tokens = top_tokens(scores, s)
    for block_n in (32, 64, 128):
        for warps in (2, 4, 8):
            ms = median_ms(lambda bn=block_n, w=warps: sparse_decode_triton(q, k, v, tokens, q_last, None, D**-0.5,
                                                                            block_n=bn, num_warps=w))  # fmt: skip
            read = 2 * tokens.numel() * D * 2
            rows.append({"batch": b, "kv_len": n, "kernel": "sparse_decode", "block_n": block_n, "warps": warps,
                         "ms": ms, "tb_s": read / ms / 1e9})  # fmt: skip
    for r in rows:
        print(r, flush=True)
    return rows


COLUMNS = [("batch", "B", ""), ("kv_len", "keys", ""), ("kernel", "kernel", ""), ("block_n", "keys per tile", ""),
           ("warps", "warps", ""), ("ms", "ms", ".4f"), ("tb_s", "TB/s read", ".2f")]  # fmt: skip


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[131072, 524288])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    rows = []
    for b in args.batches:
        for n in args.lengths:
            rows += measure(b, n)
            torch.cuda.empty_cache()
            write_results(Path(args.out), "decode_kernel_configs", environment(), rows, markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
