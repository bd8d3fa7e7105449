"""How good is the cost model on this GPU? Fit it, then check it over a grid it was not fitted on.

1. Fit (``sparsecomp.tuning.autotune.fit_cost_model``): the micro-benchmark every GPU runs once.
2. Grid: N = 1K ... 128K, densities 2% ... 60% (a random causal block selection at 128 x 128,
   the same pairs for every config: the b64 config reads it refined to 64 x 64 blocks),
   head_dim 64 / 128; B = 1, 32 query / 8 KV heads, bf16. At each point: dense SDPA (default
   backend: cuDNN on the H100; K/V repeated beforehand, as HF models do) and every kernel config,
   measured (median of ``triton.testing.do_bench``) and predicted. Reported: median relative error
   of prediction, whether the predicted-fastest option is within 5% of the measured fastest, and the
   tuned (best config) vs untuned (default config) kernel speedup.
3. Crossover: the length from which a sparse rule beats dense (index building included: the
   builders compiled as in the graph), predicted vs measured, for a streaming rule (sink 64 +
   window 1024) and block top-k (k = 16 blocks).

    python benchmarks/cost_model.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from harness import environment, markdown_table, median_ms, write_results  # noqa: E402

from sparsecomp.compiler.backend import inductor_with_opaque_ops  # noqa: E402
from sparsecomp.kernels import build_block_index  # noqa: E402
from sparsecomp.kernels.prefill.adaptive_index import block_topk_index  # noqa: E402
from sparsecomp.plan import Rule  # noqa: E402
from sparsecomp.tuning.autotune import fit_cost_model, random_selection, run_sparse, selection_index  # noqa: E402
from sparsecomp.tuning.cost_model import (  # noqa: E402
    DEFAULT_CONFIG,
    DENSE,
    KERNEL_CONFIGS,
    CostModel,
    Workload,
    ranked,
)

HQ, HKV = 32, 8
LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]
DENSITIES = [0.02, 0.05, 0.1, 0.2, 0.4, 0.6]


def sdpa_ms(q, k, v, **kwargs) -> float:
    """Dense causal SDPA (default backend), K/V repeated beforehand as HF models do."""
    k_rep, v_rep = (t.repeat_interleave(q.shape[1] // k.shape[1], 1) for t in (k, v))
    return median_ms(lambda: F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=True), **kwargs)


def grid(model, head_dims, lengths, densities, device) -> list[dict]:
    rows = []
    for d in head_dims:
        for n in lengths:
            q, k, v = (torch.randn(1, h, n, d, device=device, dtype=torch.bfloat16) for h in (HQ, HKV, HKV))
            w = Workload(1, HQ, HKV, n, n, d)
            dense_ms = sdpa_ms(q, k, v, min_runs=10)
            for density in densities:
                selection = random_selection(HQ, n, density, 128, device, seed=n)
                row = {"n": n, "head_dim": d, "density": density, "dense_ms": dense_ms,
                       "dense_pred": model.dense_ms(w)}  # fmt: skip
                for name, options in KERNEL_CONFIGS.items():
                    index, counts = selection_index(selection, 128, options.block_m, n, options.tile_m)
                    row[f"{name}_ms"] = median_ms(lambda: run_sparse(q, k, v, index, options), min_runs=10)  # noqa: B023
                    row[f"{name}_pred"] = model.kernel_ms(name, w, counts)
                    row["computed_density"] = (
                        counts.density(w) if name == DEFAULT_CONFIG else row.get("computed_density")
                    )
                options_ms = {o: row[f"{o}_ms"] for o in [DENSE, *KERNEL_CONFIGS]}
                options_pred = {o: row[f"{o}_pred"] for o in [DENSE, *KERNEL_CONFIGS]}
                fastest = min(options_ms, key=options_ms.get)
                chosen = ranked(options_pred)[0]  # what decide() picks (dense unless beaten by a margin)
                best_config = min(KERNEL_CONFIGS, key=lambda c: options_ms[c])  # noqa: B023
                row.update(
                    fastest=fastest, chosen=chosen, chosen_vs_fastest=options_ms[chosen] / options_ms[fastest],
                    best_config=best_config, tuned_speedup=options_ms[DEFAULT_CONFIG] / options_ms[best_config],
                    max_rel_err=max(abs(options_pred[o] / options_ms[o] - 1) for o in options_ms),
                )  # fmt: skip
                rows.append(row)
                ratio, err = row["chosen_vs_fastest"], row["max_rel_err"]
                print(f"d={d} N={n} p={density}: fastest {fastest} {options_ms[fastest]:.3f} ms, chosen {chosen} "
                      f"x{ratio:.3f}, worst error {err:.1%}", flush=True)  # fmt: skip
    return rows


def measured_crossover(name, rule: Rule, model, d, device, lengths) -> dict:
    """Dense vs (index building + kernel) of one rule along ``lengths``; first length sparse wins."""
    rows = []
    build, topk = (
        torch.compile(f, backend=inductor_with_opaque_ops, dynamic=True, fullgraph=True)
        for f in (build_block_index, block_topk_index)
    )
    options = KERNEL_CONFIGS[DEFAULT_CONFIG]
    for n in lengths:
        q, k, v = (torch.randn(1, h, n, d, device=device, dtype=torch.bfloat16) for h in (HQ, HKV, HKV))
        pos = torch.arange(n, device=device)[None]
        sink, window = (torch.tensor([x] * HQ, dtype=torch.int32, device=device) for x in rule.head_params(n))
        common = dict(causal=True, window=0, block_m=options.block_m, block_n=options.block_n)
        if rule.adaptive:

            def index_fn():
                return topk(q, k, pos, pos, None, [rule.k] * HQ, coverage=0.0, pool="mean", scale=d**-0.5, **common)  # noqa: B023
        else:

            def index_fn():
                return build(pos, pos, None, sink[:1], window[:1], max_blocks=None, **common)  # noqa: B023

        def total():
            index = index_fn()  # noqa: B023
            return run_sparse(q, k, v, index, options, head_sink=sink, head_window=window)  # noqa: B023

        dense = sdpa_ms(q, k, v)
        sparse = median_ms(total)
        pred = model.predictions(Workload(1, HQ, HKV, n, n, d), [rule] * HQ, {DEFAULT_CONFIG: options})
        pred_ms = {p.option: p.ms for p in pred}
        rows.append({"pattern": name, "n": n, "dense_ms": dense, "sparse_ms": sparse,
                     "dense_pred": pred_ms[DENSE], "sparse_pred": pred_ms[DEFAULT_CONFIG]})  # fmt: skip
        print(f"crossover {name} N={n}: dense {dense:.3f} sparse {sparse:.3f} ms (pred {pred_ms[DENSE]:.3f} / "
              f"{pred_ms[DEFAULT_CONFIG]:.3f})", flush=True)  # fmt: skip
    measured = next((r["n"] for r in rows if r["sparse_ms"] < r["dense_ms"]), None)
    predicted = model.crossover(Workload(1, HQ, HKV, 4096, 4096, d), [rule] * HQ, {DEFAULT_CONFIG: options})
    return {"pattern": name, "measured": measured, "predicted": predicted, "rows": rows}


def summary(rows: list[dict]) -> dict:
    errors = [abs(r[f"{o}_pred"] / r[f"{o}_ms"] - 1) for r in rows for o in [DENSE, *KERNEL_CONFIGS]]
    per_option = {
        o: statistics.median(abs(r[f"{o}_pred"] / r[f"{o}_ms"] - 1) for r in rows) for o in [DENSE, *KERNEL_CONFIGS]
    }
    within = [r["chosen_vs_fastest"] <= 1.05 for r in rows]
    return {
        "points": len(rows),
        "median_rel_err": statistics.median(errors),
        "p90_rel_err": sorted(errors)[int(0.9 * (len(errors) - 1))],
        "median_rel_err_by_option": per_option,
        "chosen_within_5pct": sum(within) / len(within),
        "worst_chosen_vs_fastest": max(r["chosen_vs_fastest"] for r in rows),
    }


def report(out: Path, rows: list[dict], crossovers: list[dict], env: dict) -> list[str]:
    stats = summary(rows)
    columns = [("n", "N", ""), ("head_dim", "d", ""), ("density", "density", ""), ("dense_ms", "SDPA ms", ".3f"),
               ("dense_pred", "pred", ".3f")]  # fmt: skip
    for name in KERNEL_CONFIGS:
        columns += [(f"{name}_ms", f"{name} ms", ".3f"), (f"{name}_pred", "pred", ".3f")]
    columns += [("fastest", "fastest", ""), ("chosen", "chosen", ""), ("chosen_vs_fastest", "chosen/fastest", ".3f"),
                ("best_config", "best config", ""), ("tuned_speedup", "tuned x default", ".3f"),
                ("max_rel_err", "worst err", ".1%")]  # fmt: skip
    speedups = [r["tuned_speedup"] for r in rows]
    lines = [
        f"Median relative error of predicted time: {stats['median_rel_err']:.1%} over {len(rows)} points x "
        f"{len(KERNEL_CONFIGS) + 1} options (90th percentile {stats['p90_rel_err']:.1%}); by option: "
        + ", ".join(f"{o} {e:.1%}" for o, e in stats["median_rel_err_by_option"].items()),
        f"Chosen option within 5% of the measured fastest at {stats['chosen_within_5pct']:.0%} of the points "
        f"(worst: {stats['worst_chosen_vs_fastest']:.3f}x).",
        f"Tuned (best config) vs untuned ({DEFAULT_CONFIG}) kernel: geometric mean "
        f"{statistics.geometric_mean(speedups):.3f}x, max {max(speedups):.3f}x.",
        "",
        "| pattern | predicted crossover N | measured crossover N |",
        "|---|---|---|",
        *[f"| {c['pattern']} | {c['predicted']} | {c['measured']} |" for c in crossovers],
        "",
        markdown_table(rows, columns),
        "",
        markdown_table(
            [r for c in crossovers for r in c["rows"]],
            [
                ("pattern", "pattern", ""),
                ("n", "N", ""),
                ("dense_ms", "SDPA ms", ".3f"),
                ("dense_pred", "pred", ".3f"),
                ("sparse_ms", "index + kernel ms", ".3f"),
                ("sparse_pred", "pred", ".3f"),
            ],
        ),  # fmt: skip
    ]
    write_results(out, "cost_model", env | {"summary": json.dumps(stats, default=float)}, rows, "\n".join(lines))
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=LENGTHS)
    p.add_argument("--densities", type=float, nargs="+", default=DENSITIES)
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--crossover-lengths", type=int, nargs="*", default=[1024, 2048, 3072, 4096, 6144, 8192])
    p.add_argument("--fit-head-dims", type=int, nargs="+", default=[64, 128], help="head dims the fit covers")
    p.add_argument("--coefficients", default=None, help="a fitted cost_model_coefficients.json (skips the fit)")
    p.add_argument("--report", nargs="+", default=None, help="only write the report from these part files")
    p.add_argument("--part", default="", help="suffix of this run's part file (a grid split over runs)")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report:
        parts = [json.loads(Path(f).read_text()) for f in args.report]
        rows = [r for part in parts for r in part["rows"]]
        crossovers = list({c["pattern"]: c for part in parts for c in part["crossovers"]}.values())  # last run wins
        print("\n".join(report(out, rows, crossovers, parts[0]["environment"])[:7]))
        return
    device = torch.device("cuda")
    if args.coefficients:
        model = CostModel.from_json(json.loads(Path(args.coefficients).read_text()))
    else:
        fit = fit_cost_model(tuple(args.fit_head_dims), device=device)
        model = fit.model
        (out / "cost_model_coefficients.json").write_text(json.dumps(model.to_json(), indent=1) + "\n")
        write_results(out, "cost_model_fit", environment(), fit.rows, markdown_table(fit.rows, [
            ("engine", "engine", ""), ("head_dim", "d", ""), ("n", "N", ""), ("density", "density", ""),
            ("ms", "measured ms", ".4f"), ("fitted_ms", "fitted ms", ".4f")]))  # fmt: skip
    part = {"environment": environment(), "rows": [], "crossovers": []}
    part_file = out / f"cost_model_part{args.part}.json"
    for d in args.head_dims:  # written after each head_dim: a run cut short keeps what it measured
        part["rows"] += grid(model, [d], args.lengths, args.densities, device)
        part_file.write_text(json.dumps(part, default=float) + "\n")
    if args.crossover_lengths:
        for name, rule in (("streaming sink 64 + window 1024", Rule("streaming", sink=64, window=1024)),
                           ("block top-k k=16", Rule("block_topk", k=16))):  # fmt: skip
            part["crossovers"].append(measured_crossover(name, rule, model, 128, device, args.crossover_lengths))
            part_file.write_text(json.dumps(part, default=float) + "\n")
    print("\n".join(report(out, part["rows"], part["crossovers"], part["environment"])[:7]))


if __name__ == "__main__":
    main()
