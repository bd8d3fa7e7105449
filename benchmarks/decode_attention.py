"""Decode attention on the GPU: one query row against a long KV cache, dense vs sparse selection.

For B=1 and B=8, 32 query / 8 KV heads, head_dim 128, bf16, at each KV length:
  dense: SDPA with its default backend, and each SDPA backend that runs (the best is the baseline);
  FlexAttention (compiled) on exactly our Double Sparsity selection, as a mask_mod over a BlockMask;
  ours: Double Sparsity at 1/8 and 1/16 of the keys (16 label channels per KV head; label scores,
  top-k and attention all inside the timing), the same with one selection per query head, and
  Quest at 1/16 (pages of 16 keys: page bounds, top-k pages, attention). Attention-only times
  (selection prebuilt) split the cost. Beside torch.topk (what ``top_tokens`` runs), our radix
  selection (``kernels/decode/top_select.py``) on the same scores, alone and inside the Double
  Sparsity and Quest steps, with a check that it picks the same keys. Medians of CUDA-graph
  replays (benchmarks/harness.py); every ratio is against the best dense time of the same run.
  Channels are random here (speed does not depend on which channels are read; accuracy is
  benchmarks/decode_accuracy.py's question).

    python benchmarks/decode_attention.py --lengths 32768 131072 524288 --batches 1 8 --out DIR
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).parent))
from harness import compiled_flex, environment, markdown_table, median_ms, write_results  # noqa: E402

from sparsecomp.kernels.decode.selection import (  # noqa: E402
    key_labels,
    label_scores,
    page_bounds,
    page_min_max,
    page_tokens,
    query_channels,
    top_tokens,
)
from sparsecomp.kernels.decode.sparse_decode import sparse_decode, sparse_decode_reference  # noqa: E402
from sparsecomp.kernels.decode.top_select import top_indices_triton  # noqa: E402

HQ, HKV, D, CHANNELS, PAGE = 32, 8, 128, 16, 16
SCALE = D**-0.5
BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def dense_times(q, k, v) -> dict:
    times = {"sdpa_default_ms": median_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))}
    for name, backend in BACKENDS.items():
        try:
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                times[f"sdpa_{name}_ms"] = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
        except RuntimeError:  # this backend does not take these shapes
            pass
    return times


def double_sparsity(q, k, v, labels, channels, q_last, n_tokens: int, n_sel: int, top=top_tokens):
    def step():
        scores = label_scores(query_channels(q, channels), labels, q_last, None, n_sel)
        return sparse_decode(q, k, v, top(scores, n_tokens), q_last, None, SCALE, 0.0)

    return step


def quest(q, k, v, kmin, kmax, page_ok, q_last, n_pages: int, top=top_tokens):
    def step():
        bounds = page_bounds(q, kmin, kmax, q_last, page_ok, PAGE, HKV)
        tokens = page_tokens(top(bounds, n_pages), PAGE)
        return sparse_decode(q, k, v, tokens, q_last, None, SCALE, 0.0)

    return step


def flex_on_selection(flex, q, k, v, tokens):
    """Flex decode with a mask_mod that keeps exactly ``tokens`` (B, Hkv, S) of each KV group."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, n = k.shape[0], k.shape[2]
    keep = torch.zeros(b, HKV, n, dtype=torch.bool, device=q.device).scatter_(2, tokens.long(), True)

    def mask_mod(bi, h, qi, kv):
        return keep[bi, h // (HQ // HKV), kv]

    block_mask = create_block_mask(mask_mod, b, HQ, 1, n, device=q.device, _compile=True)
    return lambda: flex(q, k, v, block_mask=block_mask, scale=SCALE, enable_gqa=True)


def measure(b: int, n: int, flex) -> dict:
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(b, HQ, 1, D, device=dev, dtype=torch.bfloat16, generator=g)
    k = torch.randn(b, HKV, n, D, device=dev, dtype=torch.bfloat16, generator=g)
    v = torch.randn(b, HKV, n, D, device=dev, dtype=torch.bfloat16, generator=g)
    q_last = torch.full((b,), n - 1, dtype=torch.int32, device=dev)
    channels = torch.stack([torch.randperm(D, device=dev, generator=g)[:CHANNELS] for _ in range(HKV)])
    labels = key_labels(k, channels).contiguous()
    kmin, kmax, page_ok = page_min_max(k, None, PAGE)
    row = {"batch": b, "kv_len": n, **dense_times(q, k, v)}
    best = min(t for key, t in row.items() if key.startswith("sdpa_"))
    row["best_dense_ms"] = best
    kv_bytes = 2 * k.numel() * k.element_size()
    row["dense_tb_s"] = kv_bytes / best / 1e9
    for name, fraction in (("ds8", 8), ("ds16", 16)):
        s = n // fraction
        row[f"{name}_ms"] = median_ms(double_sparsity(q, k, v, labels, channels, q_last, s, HKV))
        row[f"{name}_vs_dense"] = best / row[f"{name}_ms"]
        tokens = top_tokens(label_scores(query_channels(q, channels), labels, q_last, None, HKV), s)
        row[f"{name}_attention_ms"] = median_ms(lambda t=tokens: sparse_decode(q, k, v, t, q_last, None, SCALE, 0.0))
        read = labels.numel() * 2 + kv_bytes / fraction
        row[f"{name}_bound_vs_dense"] = kv_bytes / read  # the bytes-read limit of the speedup
        if name == "ds16":  # where the selection time goes
            qc = query_channels(q, channels)
            row["ds16_scores_ms"] = median_ms(lambda qc=qc: label_scores(qc, labels, q_last, None, HKV))
            scores = label_scores(qc, labels, q_last, None, HKV)
            row["ds16_topk_ms"] = median_ms(lambda sc=scores, s=s: top_tokens(sc, s))
            # the radix selection (kernels/decode/top_select.py) on the same scores, alone and in the step
            radix = top_indices_triton(scores, s)
            row["radix_same_keys"] = torch.equal(radix.sort(-1).values, tokens.sort(-1).values)
            row["ds16_radix_topk_ms"] = median_ms(lambda sc=scores, s=s: top_indices_triton(sc, s))
            row["ds16_radix_ms"] = median_ms(
                double_sparsity(q, k, v, labels, channels, q_last, s, HKV, top=top_indices_triton)
            )
            ref = sparse_decode_reference(q, k, v, tokens, q_last, None, SCALE)
            out = sparse_decode(q, k, v, tokens, q_last, None, SCALE, 0.0)
            row["ds16_max_abs_err_vs_fp32_ref"] = (out.float() - ref.float()).abs().max().item()
            if flex is not None and b * n <= 8 * 131072:  # its block mask build grows with B x Hq x N
                try:
                    row["flex_ds16_ms"] = median_ms(flex_on_selection(flex, q, k, v, tokens))
                    row["ds16_vs_flex"] = row["flex_ds16_ms"] / row["ds16_ms"]
                except Exception:  # noqa: BLE001  (recorded, the rest of the row still runs)
                    traceback.print_exc()
    row["ds16_per_q_head_ms"] = median_ms(double_sparsity(q, k, v, labels, channels, q_last, n // 16, HQ))
    row["quest16_ms"] = median_ms(quest(q, k, v, kmin, kmax, page_ok, q_last, n // 16 // PAGE))
    row["quest16_vs_dense"] = best / row["quest16_ms"]
    row["quest16_radix_ms"] = median_ms(
        quest(q, k, v, kmin, kmax, page_ok, q_last, n // 16 // PAGE, top=top_indices_triton)
    )
    print(row, flush=True)
    return row


COLUMNS = [
    ("batch", "B", ""),
    ("kv_len", "keys", ""),
    ("sdpa_default_ms", "SDPA default ms", ".4f"),
    ("best_dense_ms", "best dense ms", ".4f"),
    ("dense_tb_s", "dense TB/s", ".2f"),
    ("flex_ds16_ms", "Flex on DS 1/16 ms", ".4f"),
    ("ds8_ms", "DS 1/8 ms", ".4f"),
    ("ds8_vs_dense", "DS 1/8 x", ".2f"),
    ("ds16_ms", "DS 1/16 ms", ".4f"),
    ("ds16_scores_ms", "of which label scores ms", ".4f"),
    ("ds16_topk_ms", "of which top-k ms", ".4f"),
    ("ds16_radix_topk_ms", "radix top-k instead ms", ".4f"),
    ("ds16_radix_ms", "DS 1/16 with radix ms", ".4f"),
    ("ds16_attention_ms", "of which attention ms", ".4f"),
    ("ds16_vs_dense", "DS 1/16 x", ".2f"),
    ("ds16_bound_vs_dense", "bytes limit x", ".2f"),
    ("ds16_vs_flex", "DS 1/16 vs Flex x", ".2f"),
    ("ds16_per_q_head_ms", "DS 1/16 per-q-head ms", ".4f"),
    ("quest16_ms", "Quest 1/16 ms", ".4f"),
    ("quest16_vs_dense", "Quest 1/16 x", ".2f"),
    ("quest16_radix_ms", "Quest 1/16 with radix ms", ".4f"),
]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072, 524288])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--no-flex", action="store_true")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    flex = None if args.no_flex else compiled_flex()
    rows = []
    for b in args.batches:
        for n in args.lengths:
            try:
                rows.append(measure(b, n, flex))
            except Exception:  # noqa: BLE001
                traceback.print_exc()
            torch.cuda.empty_cache()
            # after every row: a run cut short still leaves what it measured
            write_results(Path(args.out), "decode_attention", environment(), rows, markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
