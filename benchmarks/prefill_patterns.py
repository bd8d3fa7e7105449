"""Adaptive prefill patterns on the GPU: index building + kernel vs SDPA (cuDNN and FA2), and our
kernel vs FlexAttention on the same pattern (``flex_index.py``: Flex given our index as its block
mask, both prebuilt; ``--no-flex`` to skip).

B=1, 32 query / 8 KV heads, head_dim 128, bf16. Random Q/K have no attention structure (every
pattern would select everything or noise), so the inputs are synthetic but structured the way
trained LMs are: queries and keys share a direction rotated by RoPE (attention decays with
distance: a local band of slashes), plus a few heavy keys every query attends to (vertical
stripes). Patterns: vertical-slash with MInference's default budget (1000 verticals, 6096 slashes,
last 64 queries), the same under FlexPrefill's cumulative cut at 95% of the estimated attention
(``vertical_slash_mass95``), SampleAttention (alpha 0.95), block top-k at ~10% of the causal blocks.
Medians over >= 5 runs (benchmarks/harness.py); SDPA and Flex measured in the same run. ``--inputs``
picks the inputs' locality (``LOCALITY``: "strong", or "smollm2", matched to the real model's);
up to ``--recall-max`` tokens each pattern's attention kept and output error are measured too.
Index builders are compiled as the sparsecomp backend compiles them in a model (``--eager-index``:
eager, as the first pattern measurements did).

    python benchmarks/prefill_patterns.py --lengths 32768 131072 --inputs smollm2 --out benchmarks/results
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
from flex_index import index_block_mask  # noqa: E402
from harness import compiled_flex, environment, markdown_table, median_ms, write_results  # noqa: E402

from sparsecomp.calibration.recall import pattern_recall  # noqa: E402
from sparsecomp.compiler.backend import inductor_with_opaque_ops  # noqa: E402
from sparsecomp.kernels import index_positions, sparse_attention_call  # noqa: E402
from sparsecomp.kernels.prefill.adaptive_index import block_topk_index, sample_index, vertical_slash_index  # noqa: E402

HQ, HKV, D, BLOCK = 32, 8, 128, 128
SCALE = D**-0.5


def rope(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    n, d = x.shape[-2], x.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    ang = torch.arange(n, device=x.device, dtype=torch.float32)[:, None] * inv[None, :]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., 0::2].float(), x[..., 1::2].float()
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1).flatten(-2).to(x.dtype)


# Input locality: (weight of the shared direction, RoPE base). "strong" attends almost only near the
# diagonal (a 1024-key window keeps 99.8% of the attention at 4K); "smollm2" matches SmolLM2-135M's
# measured locality at 4K (sink 64 + window 256 / 512 / 1024 keep 0.74 / 0.85 / 0.92 of the
# attention here, 0.79 / 0.84 / 0.91 in SmolLM2: benchmarks/results/pattern_recall.md) with
# Llama-3's RoPE base.
LOCALITY = {"strong": (3.0, 1e4), "smollm2": (1.4, 5e5)}


def structured_qkv(n: int, seed: int = 0, locality: str = "strong"):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    weight, base = LOCALITY[locality]

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=gen)

    shared = randn(1, HKV, 1, D)
    q = rope((weight * shared.repeat_interleave(HQ // HKV, 1) + randn(1, HQ, n, D)).to(torch.bfloat16), base)
    k = weight * shared + randn(1, HKV, n, D)
    heavy = torch.randint(0, n, (64,), device="cuda", generator=gen)
    k[:, :, heavy] += (4 / 3) * weight * shared[:, :, 0, None]
    k = rope(k.to(torch.bfloat16), base)
    v = randn(1, HKV, n, D).to(torch.bfloat16)
    return q, k, v


_COMPILED: dict = {}


def compiled(builder):
    """``builder`` compiled as the sparsecomp backend compiles it inside a model's graph (Inductor,
    dynamic shapes, the sparse ops opaque), once per builder."""
    if builder not in _COMPILED:
        _COMPILED[builder] = torch.compile(builder, backend=inductor_with_opaque_ops, dynamic=True, fullgraph=True)
    return _COMPILED[builder]


def builders(n: int, eager: bool = False):
    common = dict(scale=SCALE, causal=True, window=0, block_m=BLOCK, block_n=BLOCK)
    n_qb = -(-n // BLOCK)
    topk = max(1, round(0.1 * (n_qb + 1) / 2) - 2)  # ~10% of the causal blocks with the forced ones
    vs, sample, top = (f if eager else compiled(f) for f in (vertical_slash_index, sample_index, block_topk_index))
    return {
        "vertical_slash": lambda q, k, p: vs(q, k, p, p, None, 1000, 6096, last_q=64, sink=64, local=64, **common),
        "vertical_slash_mass95": lambda q, k, p: vs(
            q, k, p, p, None, 1000, 6096, last_q=64, sink=64, local=64, mass=0.95, **common
        ),
        "sample": lambda q, k, p: sample(
            q, k, p, p, None, 0.95, window_ratio=0.02, sample_ratio=min(0.05, 1024 / n), **common
        ),
        "block_topk": lambda q, k, p: top(q, k, p, p, None, topk, coverage=0.0, pool="mean", **common),
    }


def computed_density(index, n: int) -> float:
    causal_blocks = (-(-n // BLOCK)) * (-(-n // BLOCK) + 1) / 2
    blocks = (index.full_count.sum() + index.part_count.sum()).item() / HQ
    cols = 0.0
    if index.columns is not None:
        cols = index.column_count.sum().item() / HQ / BLOCK  # a tile of BLOCK columns costs a block
    return (blocks + cols) / causal_blocks


def sdpa_causal_ms(q, k, v, backend: SDPBackend) -> float:
    k_rep, v_rep = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
    with sdpa_kernel([backend]):
        return median_ms(lambda: F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=True), min_runs=5)


def run_length(n: int, patterns: list[str], locality: str, recall_max: int, eager: bool, flex) -> list[dict]:
    q, k, v = structured_qkv(n, seed=n, locality=locality)
    pos = index_positions(q, 2)
    zeros = torch.zeros(HQ, dtype=torch.int32, device="cuda")
    sdpa_ms = sdpa_causal_ms(q, k, v, SDPBackend.CUDNN_ATTENTION)
    fa2_ms = sdpa_causal_ms(q, k, v, SDPBackend.FLASH_ATTENTION)
    rows = []
    for name in patterns:
        row = {"N": n, "inputs": locality, "pattern": name, "sdpa_ms": sdpa_ms, "fa2_ms": fa2_ms}
        try:
            build = builders(n, eager)[name]

            def op(index):
                return sparse_attention_call(
                    q, k, v, index, q_pos=pos, k_pos=pos, head_sink=zeros, head_window=zeros, scale=SCALE, causal=True
                )

            index = build(q, k, pos)
            row["density"] = computed_density(index, n)
            if n <= recall_max:  # exact attention in row chunks: N^2 work
                recall = pattern_recall(q, k, v, index, pos, pos, None, zeros, zeros, scale=SCALE, causal=True,
                                        window=0, block_m=BLOCK, block_n=BLOCK).summary()  # fmt: skip
                row["cra"], row["out_err"] = recall["cra"], recall["out_err"]
            row["index_ms"] = median_ms(lambda build=build: build(q, k, pos), min_runs=5)
            row["kernel_ms"] = median_ms(lambda index=index: op(index), min_runs=5)
            row["total_ms"] = median_ms(lambda build=build: op(build(q, k, pos)), min_runs=5)
            row["vs_sdpa"] = sdpa_ms / row["total_ms"]
            row["vs_fa2"] = fa2_ms / row["total_ms"]
            row["index_share"] = row["index_ms"] / row["total_ms"]
            if flex is not None:
                row.update(flex_timing(flex, q, k, v, index, n, row["kernel_ms"]))
            del index
        except Exception as e:  # one failure must not lose the others
            row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
            traceback.print_exc()
        torch.cuda.empty_cache()
        print({a: (round(b, 4) if isinstance(b, float) else b) for a, b in row.items()}, flush=True)
        rows.append(row)
    return rows


def flex_timing(flex, q, k, v, index, n: int, kernel_ms: float) -> dict:
    """Flex on our pattern (its block mask from our index, prebuilt) vs our kernel alone."""
    try:
        mask = index_block_mask(index, n, n, BLOCK)
        flex_ms = median_ms(lambda: flex(q, k, v, block_mask=mask, scale=SCALE, enable_gqa=True), min_runs=5)
        return {"flex_ms": flex_ms, "vs_flex": flex_ms / kernel_ms}
    except Exception as e:  # Flex failing must not hide our numbers
        return {"error": f"flex: {type(e).__name__}: {str(e)[:120]}"}


def profile_index(n: int, patterns: list[str], locality: str, out: Path) -> None:
    """Where the index building time goes: device time per CUDA kernel over five builds per pattern."""
    q, k, _ = structured_qkv(n, seed=n, locality=locality)
    pos = index_positions(q, 2)
    lines = []
    for name in patterns:
        build = builders(n)[name]
        build(q, k, pos)  # warm up (compiles the builder and its Triton kernels)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                build(q, k, pos)
            torch.cuda.synchronize()
        events = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
        total = sum(e.device_time_total for e in events) / 5
        lines.append(f"## {name} index at N={n} ({locality} inputs): {total / 1000:.3f} ms of device time per build")
        lines += [f"  {e.device_time_total / 5000:7.3f} ms  x{e.count // 5:<3d} {e.key[:110]}" for e in events[:12]]
        lines.append("")
    (out / "prefill_patterns_index_profile.txt").write_text("\n".join(lines))
    print("\n".join(lines))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072, 524288])
    p.add_argument("--patterns", nargs="+", default=["vertical_slash", "vertical_slash_mass95", "sample", "block_topk"])
    p.add_argument("--inputs", choices=sorted(LOCALITY), default="strong", help="locality of the synthetic Q/K")
    p.add_argument("--recall-max", type=int, default=32768, help="also measure CRA / output error up to this N")
    p.add_argument("--eager-index", action="store_true", help="build indexes eagerly (default: compiled)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--profile", type=int, default=0, help="also profile the index builders at this length")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    args = p.parse_args(argv)
    if args.profile:
        profile_index(args.profile, args.patterns, args.inputs, Path(args.out))
    columns = [
        ("N", "N", ""),
        ("inputs", "inputs", ""),
        ("pattern", "pattern", ""),
        ("density", "computed density", ".3f"),
        ("cra", "attention kept", ".3f"),
        ("out_err", "output rel. error", ".3f"),
        ("sdpa_ms", "SDPA cuDNN ms", ".2f"),
        ("fa2_ms", "SDPA FA2 ms", ".2f"),
        ("index_ms", "index ms", ".2f"),
        ("kernel_ms", "kernel ms", ".2f"),
        ("total_ms", "index+kernel ms", ".2f"),
        ("vs_sdpa", "x SDPA", ".2f"),
        ("vs_fa2", "x FA2", ".2f"),
        ("flex_ms", "Flex ms (same pattern)", ".2f"),
        ("vs_flex", "kernel x Flex", ".2f"),
        ("index_share", "index share", ".2f"),
        ("error", "error", ""),
    ]
    flex = None if args.no_flex else compiled_flex()
    rows, env = [], environment()
    for n in args.lengths:
        rows += run_length(n, args.patterns, args.inputs, args.recall_max, args.eager_index, flex)
        write_results(Path(args.out), "prefill_patterns", env, rows, markdown_table(rows, columns))
    print(markdown_table(rows, columns))


if __name__ == "__main__":
    main()
