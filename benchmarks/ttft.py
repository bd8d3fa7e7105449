"""Time to first token of a Llama-3-8B-shaped model (random bf16 weights) against the best dense path
of the same run: eager Hugging Face (SDPA with its default backend, fused causal kernels) and
``torch.compile`` (under which transformers materializes an N x N mask), beside sparsecomp's dense
plan and sparse plans, all under the defaults a user gets (``cost_model="auto"``), and the floor: the
same model with attention made free (it returns its queries), compiled, the limit no attention
method can beat. Per row: median forward ms (``logits_to_keep=1``, no KV cache), compile time (the
first call), peak memory, the speedup against the best dense row of the same length and batch,
and the time against the floor's. Plots of speedup and peak memory against length (``--plot``).

    python benchmarks/ttft.py --layers 4 --batches 1 4 --lengths 1024 2048 4096 8192 16384 32768 65536 131072
    python benchmarks/ttft.py --plot-only benchmarks/results/ttft.json --plot docs/ttft  # pictures again
    python benchmarks/ttft.py --merge short.json long.json --out benchmarks/results  # lengths run apart
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import environment, free_attention, markdown_table, median_ms, merge_runs, write_results  # noqa: E402

import sparsecomp  # noqa: E402
from sparsecomp.demo import build_model  # noqa: E402

DENSE_PATHS = ("eager", "torch.compile")
FLOOR = "floor"
DEFAULT_PLANS = ("dense", "streaming:sink=128,window=2048")
LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]
COLUMNS = [
    ("N", "N", ""), ("batch", "B", ""), ("path", "path", ""), ("ms", "forward ms", ".2f"),
    ("vs_best_dense", "speedup vs best dense", ".2f"), ("vs_floor", "x floor time", ".2f"),
    ("peak_gib", "peak GiB", ".1f"), ("first_call_s", "first call s", ".1f"), ("became", "sites became", ""),
    ("note", "note", ""),
]  # fmt: skip


PLOTS = (("vs_best_dense", "speedup vs best dense", "speedup"), ("peak_gib", "peak GiB", "memory"))


def _runner(name: str, model):
    model.config._attn_implementation = "free" if name == FLOOR else "sdpa"
    if name == "eager":
        return model
    if name in ("torch.compile", FLOOR):
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
    if name not in (*DENSE_PATHS, FLOOR) and row["ms"] is not None:
        sites = sparsecomp.inspect(run).sites
        row["became"] = ", ".join(sorted({s.became for s in sites}))
    return row


def with_ratios(rows: list[dict]) -> list[dict]:
    """Each row's speedup against the best dense row and time against the floor of its (N, B)."""
    best = min((r["ms"] for r in rows if r["path"] in DENSE_PATHS and r["ms"] is not None), default=None)
    floor = next((r["ms"] for r in rows if r["path"] == FLOOR and r["ms"] is not None), None)
    for r in rows:
        ok = r["ms"] is not None
        r["vs_best_dense"] = best / r["ms"] if ok and best is not None else None
        r["vs_floor"] = r["ms"] / floor if ok and floor is not None else None
    return rows


def merged(results: list[dict]) -> tuple[dict, list[dict]]:
    """The rows of several runs by B then N (path order kept), ratios recomputed per (N, B)."""
    env, rows = merge_runs(results, key=lambda r: (r["batch"], r["N"], r["path"]))
    rows.sort(key=lambda r: (r["batch"], r["N"]))
    for shape in dict.fromkeys((r["batch"], r["N"]) for r in rows):
        with_ratios([r for r in rows if (r["batch"], r["N"]) == shape])
    return env, rows


def plot(rows: list[dict], stem: Path, title: str = "") -> list[Path]:
    """Per batch size, speedup against the best dense row and peak memory against length, one line
    per path, written as ``{stem}_speedup_b{B}.png`` and ``{stem}_memory_b{B}.png``."""
    from sparsecomp.plots import _pyplot

    plt = _pyplot()
    written = []
    for batch in sorted({r["batch"] for r in rows}):
        part = [r for r in rows if r["batch"] == batch and r["ms"] is not None]
        for key, label, name in PLOTS:
            fig, ax = plt.subplots(figsize=(6.4, 4))
            for path in dict.fromkeys(r["path"] for r in part):
                points = sorted((r["N"], r[key]) for r in part if r["path"] == path and r.get(key) is not None)
                if points:
                    ax.plot(*zip(*points, strict=True), marker="o", label=path)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("prompt tokens")
            ax.set_ylabel(label)
            ax.set_title(f"{title} B={batch}".strip(), fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            written.append(Path(f"{stem}_{name}_b{batch}.png"))
            fig.savefig(written[-1], dpi=120)
            plt.close(fig)
    return written


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--lengths", type=int, nargs="+", default=LENGTHS)
    p.add_argument("--batches", type=int, nargs="+", default=[1])
    p.add_argument("--plans", nargs="*", default=list(DEFAULT_PLANS))
    p.add_argument("--skip-compile-above", type=int, default=1 << 30,
                   help="leave torch.compile out above this length (its N x N mask may not fit)")  # fmt: skip
    p.add_argument("--baselines", nargs="*", default=[*DENSE_PATHS, FLOOR], choices=[*DENSE_PATHS, FLOOR],
                   help="the dense paths and floor to measure (to re-run some rows, then --merge)")  # fmt: skip
    p.add_argument("--min-runs", type=int, default=10, help="timed runs at least (a 128K forward takes seconds)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--stem", default="ttft")
    p.add_argument("--plot", default=None, help="write the plots to files starting with this path (e.g. docs/ttft)")
    p.add_argument("--plot-only", default=None, help="plot the rows of this results .json; measure nothing")
    p.add_argument("--merge", nargs="+", default=None, help="join results .json files of one GPU; measure nothing")
    args = p.parse_args(argv)
    if args.merge:
        env, rows = merged([json.loads(Path(f).read_text()) for f in args.merge])
        write_results(Path(args.out), args.stem, env, rows, markdown_table(rows, COLUMNS))
        if args.plot:
            print(*plot(rows, Path(args.plot), env.get("gpu", "")), sep="\n")
        return
    if args.plot_only:
        saved = json.loads(Path(args.plot_only).read_text())
        print(*plot(saved["rows"], Path(args.plot or args.stem), saved["environment"].get("gpu", "")), sep="\n")
        return
    from transformers import AttentionInterface

    AttentionInterface.register("free", free_attention)
    model = build_model("llama3-8b", args.layers, torch.bfloat16, "cuda")
    env = environment() | {"model": f"Llama-3-8B shape, {args.layers} layers, random bf16 weights"}
    rows = []
    for batch in args.batches:
        for n in args.lengths:
            ids = torch.randint(0, model.config.vocab_size, (batch, n), device="cuda")
            too_long = {"torch.compile"} if n > args.skip_compile_above else set()
            baselines = [b for b in args.baselines if b not in too_long]
            paths = [b for b in baselines if b != FLOOR] + args.plans + [b for b in baselines if b == FLOOR]
            group = with_ratios([measure(name, model, ids, args.min_runs) for name in paths])
            print(*group, sep="\n", flush=True)
            rows.extend(group)
            write_results(Path(args.out), args.stem, env, rows, markdown_table(rows, COLUMNS))  # after each shape
    if args.plot:
        plot(rows, Path(args.plot), env.get("gpu", ""))


if __name__ == "__main__":
    main()
