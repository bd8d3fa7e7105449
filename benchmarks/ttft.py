"""Time to first token of a Llama-3-8B-shaped model (random bf16 weights) against the best dense path
of the same run: eager Hugging Face (SDPA with its default backend, fused causal kernels) and
``torch.compile`` (under which transformers materializes an N x N mask), beside sparsecomp's dense
plan and sparse plans, all under the defaults a user gets (``cost_model="auto"``). Per row: median
forward ms (B=1 unless --batch, ``logits_to_keep=1``, no KV cache), compile time, peak memory, and
the speedup against the best dense row of the same length.

    python benchmarks/ttft.py --layers 4 --lengths 2048 8192 32768 131072 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import environment, markdown_table, median_ms, write_results  # noqa: E402

import sparsecomp  # noqa: E402
from sparsecomp.demo import build_model  # noqa: E402

DENSE_PATHS = ("eager", "torch.compile")
DEFAULT_PLANS = ("dense", "streaming:sink=128,window=2048")


def _runner(name: str, model):
    if name == "eager":
        return model
    if name == "torch.compile":
        return torch.compile(model, dynamic=False)
    return sparsecomp.compile(model, name, dynamic=False)


def measure(name: str, model, ids, min_runs: int = 10) -> dict:
    """One row: first call (compile) seconds, median ms, peak GiB; an out-of-memory row says so."""
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    run = _runner(name, model)
    row = {"path": name, "N": ids.shape[1], "batch": ids.shape[0]}
    try:
        with torch.no_grad():
            t0 = time.perf_counter()
            run(ids, use_cache=False, logits_to_keep=1)
            torch.cuda.synchronize()
            row["first_call_s"] = time.perf_counter() - t0
            row["ms"] = median_ms(lambda: run(ids, use_cache=False, logits_to_keep=1), min_runs=min_runs)
    except torch.OutOfMemoryError:
        row["ms"] = None
        row["note"] = "out of GPU memory"
    row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if name not in DENSE_PATHS and row["ms"] is not None:
        sites = sparsecomp.inspect(run).sites
        row["became"] = ", ".join(sorted({s.became for s in sites}))
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768, 131072])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--plans", nargs="+", default=list(DEFAULT_PLANS))
    p.add_argument("--skip-compile-above", type=int, default=1 << 30,
                   help="leave torch.compile out above this length (its N x N mask may not fit)")  # fmt: skip
    p.add_argument("--min-runs", type=int, default=10, help="timed runs at least (a 128K forward takes seconds)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--stem", default="ttft")
    args = p.parse_args(argv)
    model = build_model("llama3-8b", args.layers, torch.bfloat16, "cuda")
    columns = [
        ("N", "N", ""), ("batch", "B", ""), ("path", "path", ""), ("ms", "forward ms", ".2f"),
        ("vs_best_dense", "speedup vs best dense", ".2f"), ("peak_gib", "peak GiB", ".1f"),
        ("first_call_s", "first call s", ".1f"), ("became", "sites became", ""), ("note", "note", ""),
    ]  # fmt: skip
    env = environment() | {"model": f"Llama-3-8B shape, {args.layers} layers, random bf16 weights"}
    rows = []
    for n in args.lengths:
        ids = torch.randint(0, model.config.vocab_size, (args.batch, n), device="cuda")
        paths = [d for d in DENSE_PATHS if d != "torch.compile" or n <= args.skip_compile_above]
        length_rows = [measure(name, model, ids, args.min_runs) for name in [*paths, *args.plans]]
        best = min(r["ms"] for r in length_rows if r["path"] in DENSE_PATHS and r["ms"] is not None)
        for r in length_rows:
            r["vs_best_dense"] = None if r["ms"] is None else best / r["ms"]
            print(r, flush=True)
        rows.extend(length_rows)
        write_results(Path(args.out), args.stem, env, rows, markdown_table(rows, columns))  # after each length


if __name__ == "__main__":
    main()
