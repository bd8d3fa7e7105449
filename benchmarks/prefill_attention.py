"""Prefill attention on the GPU: SDPA (cuDNN default and FA2), FlexAttention and sparsecomp.

One run measures, for B=1, 32 query / 8 KV heads, head_dim 128, bf16, at each length:
  (a) dense causal, (b) sink 128 + window 2048, (c) a random block-sparse index at 10% of the causal
  blocks (plus the diagonal). Every time is a median over >= 30 runs (benchmarks/harness.py: CUDA
  events, or CUDA graph replays for calls under 2 ms); ratios are against SDPA measured in the same run.
  sparsecomp is timed for the kernel alone (index prebuilt, as Flex's block mask is) and for index
  building + kernel.

    python benchmarks/prefill_attention.py --lengths 8192 32768 131072 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import itertools
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

sys.path.insert(0, str(Path(__file__).parent))
from harness import compiled_flex, environment, markdown_table, median_ms, write_results  # noqa: E402

from sparsecomp.kernels import (  # noqa: E402
    KernelOptions,
    SparseIndex,
    build_block_index,
    index_positions,
    sparse_attention_call,
)

HQ, HKV, D, BLOCK = 32, 8, 128, 128
SINK, WINDOW = 128, 2048


def streaming_mask(b, h, q, k):
    return (k <= q) & ((q - k < WINDOW) | (k < SINK))


def causal_mask(b, h, q, k):
    return k <= q


def random_index(n: int, density: float, device, seed: int = 0):
    """Per (head, query block): the diagonal block (masked) plus random earlier blocks (full) so that
    ``density`` of the causal blocks are computed."""
    nb = -(-n // BLOCK)
    gen = torch.Generator(device=device).manual_seed(seed)
    qb = torch.arange(nb, device=device)[:, None]
    kb = torch.arange(nb, device=device)[None, :]
    causal_blocks = nb * (nb + 1) / 2
    p = max(0.0, (density * causal_blocks - nb) / max(1.0, causal_blocks - nb))
    full = (torch.rand(HQ, nb, nb, generator=gen, device=device) < p) & (kb < qb)
    full_count = full.sum(-1, dtype=torch.int32)[None]
    full_blocks = torch.sort((~full).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)[None]
    part_blocks = torch.zeros(1, HQ, nb, nb, dtype=torch.int32, device=device)
    part_blocks[..., 0] = torch.arange(nb, device=device, dtype=torch.int32)
    part_count = torch.ones(1, HQ, nb, dtype=torch.int32, device=device)
    computed = (full_count.sum() + part_count.sum()).item() / (HQ * causal_blocks)
    return SparseIndex(full_blocks.contiguous(), full_count, part_blocks, part_count, BLOCK, BLOCK), computed


def pattern_index(pattern: str, q, k):
    """The sparse index of a pattern and the fraction of causal pairs it computes."""
    n = q.shape[2]
    q_pos, k_pos = index_positions(q, 2), index_positions(k, 2)
    if pattern == "random10":
        index, density = random_index(n, 0.10, q.device)
        return q_pos, k_pos, index, density, (0, 0), None
    sink, window = (SINK, WINDOW) if pattern == "streaming" else (0, 0)
    z = lambda x: torch.tensor([x], dtype=torch.int32, device=q.device)  # noqa: E731
    from sparsecomp.kernels import block_index_bound

    bound = block_index_bound(
        [sink], [window], causal=True, window=0, block_m=BLOCK, block_n=BLOCK, positions_are_indices=True
    )

    def build():
        return build_block_index(
            q_pos,
            k_pos,
            None,
            z(sink),
            z(window),
            causal=True,
            window=0,
            block_m=BLOCK,
            block_n=BLOCK,
            max_blocks=bound,
        )

    index = build()
    if pattern == "dense":
        density = 1.0
    else:
        kept = torch.minimum(torch.arange(n, device=q.device) + 1, torch.tensor(WINDOW, device=q.device))
        kept = kept + torch.clamp(torch.arange(n, device=q.device) + 1 - WINDOW, 0, SINK)
        density = kept.sum().item() / (n * (n + 1) / 2)
    return q_pos, k_pos, index, density, (sink, window), build


def flex_block_mask(pattern: str, n: int, index, device):
    if pattern == "random10":
        full_blocks, full_count, part_blocks, part_count = index[:4]
        return BlockMask.from_kv_blocks(
            part_count, part_blocks, full_count, full_blocks, BLOCK_SIZE=BLOCK, mask_mod=causal_mask
        )
    mod = streaming_mask if pattern == "streaming" else causal_mask
    return create_block_mask(mod, 1, 1, n, n, device=device, BLOCK_SIZE=BLOCK, _compile=True)


def kernel_options(cfg: dict) -> KernelOptions:
    """The launch config ``cfg`` ({} = defaults) at the benchmark's block size."""
    return KernelOptions(block_m=BLOCK, block_n=BLOCK, **cfg)


def run_op(q, k, v, q_pos, k_pos, index, sinks, windows, options: KernelOptions):
    """One call of the sparse op on a causal site under ``options`` (built once, outside the timing)."""
    return sparse_attention_call(
        q, k, v, index, q_pos=q_pos, k_pos=k_pos, head_sink=sinks, head_window=windows, scale=D**-0.5,
        causal=True, options=options,
    )  # fmt: skip


def measure_pattern(pattern: str, q, k, v, flex, sdpa_ms, tuning: dict) -> dict:
    n, dev = q.shape[2], q.device
    q_pos, k_pos, index, density, (sink, window), build = pattern_index(pattern, q, k)
    sinks = torch.full((HQ,), sink, dtype=torch.int32, device=dev)
    windows = torch.full((HQ,), window, dtype=torch.int32, device=dev)

    default, tuned = kernel_options({}), kernel_options(tuning)

    def ours(index=index, options=tuned):
        return run_op(q, k, v, q_pos, k_pos, index, sinks, windows, options)

    row = {"density": density, "default_ms": median_ms(lambda: ours(options=default))}
    row["sparsecomp_ms"] = median_ms(ours) if tuning else row["default_ms"]
    row["config"] = " ".join(f"{k}={v}" for k, v in tuning.items()) or "default"
    if build is not None:
        row["index_ms"] = median_ms(build)
        row["sparsecomp_total_ms"] = median_ms(lambda: ours(build()))
    if sdpa_ms:
        row["vs_sdpa"] = sdpa_ms / row["sparsecomp_ms"]
        row["ideal_ms"] = density * sdpa_ms
        row["vs_ideal"] = row["sparsecomp_ms"] / row["ideal_ms"]
    row["tflops"] = 4 * HQ * D * density * n * (n + 1) / 2 / row["sparsecomp_ms"] / 1e9
    if flex is not None:
        try:
            bm = flex_block_mask(pattern, n, index, dev)
            row["flex_ms"] = median_ms(lambda: flex(q, k, v, block_mask=bm, enable_gqa=True))
            row["vs_flex"] = row["flex_ms"] / row["sparsecomp_ms"]
        except Exception as e:  # Flex failing must not hide our numbers
            row["error"] = f"flex: {type(e).__name__}: {str(e)[:120]}"
    return row


def tune(pattern: str, n: int) -> dict:
    """Sweep query tile, warps, stages and TMA loads (key tile 128: 64 lost every sweep before) for a
    pattern at length n; return the fastest config whose output matches the pointer-load default's."""
    q = torch.randn(1, HQ, n, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, HKV, n, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q_pos, k_pos, index, _, (sink, window), _ = pattern_index(pattern, q, k)
    sinks = torch.full((HQ,), sink, dtype=torch.int32, device="cuda")
    windows = torch.full((HQ,), window, dtype=torch.int32, device="cuda")
    expected = run_op(q, k, v, q_pos, k_pos, index, sinks, windows, kernel_options({"tma": 0})).float()
    best, results = None, []
    # 4 warps lost by 2x on 128-row tiles, 8 warps by 1.4x on 64-row tiles (sweeps of 2026-11-24)
    for (tile_m, warps), stages, tma in itertools.product(((64, 4), (128, 8)), (2, 3), (0, 1)):
        cfg = {"tile_m": tile_m, "tile_n": 128, "num_warps": warps, "num_stages": stages, "tma": tma}
        try:
            opts = kernel_options(cfg)
            out = run_op(q, k, v, q_pos, k_pos, index, sinks, windows, opts).float()
            err = ((out - expected).norm() / expected.norm()).item()
            if not err < 1e-2:  # a miscompiled variant must never win
                print(f"tune {pattern} {cfg}: wrong output (rel. diff {err:.2e})", flush=True)
                continue
            ms = median_ms(lambda opts=opts: run_op(q, k, v, q_pos, k_pos, index, sinks, windows, opts))
        except Exception as e:  # e.g. out of shared memory
            print(f"tune {pattern} {cfg}: {type(e).__name__}: {str(e)[:160]}", flush=True)
            continue
        results.append((ms, cfg))
        if best is None or ms < best[0]:
            best = (ms, cfg)
    print(f"tune {pattern} N={n}:", flush=True)
    for ms, c in sorted(results, key=lambda r: r[0]):
        print(f"  {ms:.3f} ms {c}", flush=True)
    return best[1] if best else {}


def run_length(n: int, patterns: list[str], flex, skip_dense_sdpa: bool, tuned: dict) -> list[dict]:
    dev = "cuda"
    torch.manual_seed(n)
    q = torch.randn(1, HQ, n, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, HKV, n, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn(1, HKV, n, D, device=dev, dtype=torch.bfloat16)
    rows = []
    sdpa_ms = fa2_ms = None
    if not skip_dense_sdpa:
        k_rep, v_rep = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
        sdpa_ms = median_ms(lambda: F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=True))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            fa2_ms = median_ms(lambda: F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=True))
        del k_rep, v_rep
    for pattern in patterns:
        row = {"N": n, "pattern": pattern, "sdpa_cudnn_ms": sdpa_ms, "sdpa_fa2_ms": fa2_ms}
        try:
            row.update(measure_pattern(pattern, q, k, v, flex, sdpa_ms, tuned.get(pattern, {})))
        except Exception as e:  # one failed configuration must not lose the others
            row["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        rows.append(row)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--patterns", nargs="+", default=["dense", "streaming", "random10"])
    p.add_argument("--no-flex", action="store_true")
    p.add_argument(
        "--sparse-only-from",
        type=int,
        default=262144,
        help="from this length on, skip dense SDPA and dense patterns (time)",
    )
    p.add_argument("--tune-at", type=int, default=32768, help="sweep launch configs at this length (0: off)")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    flex = None if args.no_flex else compiled_flex()
    tuned = {p: tune(p, args.tune_at) for p in args.patterns} if args.tune_at else {}
    rows, env = [], environment()
    columns = [
        ("N", "N", ""),
        ("pattern", "pattern", ""),
        ("density", "density", ".3f"),
        ("sdpa_cudnn_ms", "SDPA cuDNN ms", ".3f"),
        ("sdpa_fa2_ms", "SDPA FA2 ms", ".3f"),
        ("flex_ms", "Flex ms", ".3f"),
        ("default_ms", "ours (default cfg) ms", ".3f"),
        ("sparsecomp_ms", "ours ms", ".3f"),
        ("config", "config", ""),
        ("index_ms", "index ms", ".3f"),
        ("sparsecomp_total_ms", "ours+index ms", ".3f"),
        ("vs_sdpa", "x SDPA", ".2f"),
        ("vs_flex", "x Flex", ".2f"),
        ("vs_ideal", "/ ideal", ".2f"),
        ("tflops", "TFLOP/s", ".0f"),
        ("error", "error", ""),
    ]
    for n in args.lengths:
        big = n >= args.sparse_only_from
        patterns = [x for x in args.patterns if not (big and x == "dense")]
        rows += run_length(n, patterns, flex, skip_dense_sdpa=big, tuned=tuned)
        torch.cuda.empty_cache()
        # written after every length, so a run cut short keeps what it measured
        write_results(Path(args.out), "prefill_attention", env, rows, markdown_table(rows, columns))
    print(markdown_table(rows, columns))


if __name__ == "__main__":
    main()
