"""Fit the decode cost model (``sparsecomp/tuning/decode_cost.py``) on a decode attention run and
check it on what the fit did not see: each rule's whole step (Double Sparsity 1/8 and 1/16, one
selection per query head, Quest 1/16) against its measured time, and the dense/selection crossover.

    python benchmarks/decode_cost_fit.py --rows benchmarks/results/decode_attention.json --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from harness import markdown_table  # noqa: E402

from sparsecomp.tuning.decode_cost import benchmark_work, fit  # noqa: E402

CHECKS = [  # (measured key, fraction, kind, per query head)
    ("ds8_ms", 8, "double_sparsity", False),
    ("ds16_ms", 16, "double_sparsity", False),
    ("ds16_per_q_head_ms", 16, "double_sparsity", True),
    ("quest16_ms", 16, "quest", False),
]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="benchmarks/results/decode_attention.json")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    run = json.loads(Path(args.rows).read_text())
    env, rows = run["environment"], run["rows"]
    model = fit(rows, info={"gpu": env.get("gpu"), "torch": env.get("torch"), "triton": env.get("triton")})
    table = []
    for r in rows:
        dense = model.dense_ms(benchmark_work(r, 16))
        table.append({"batch": r["batch"], "kv_len": r["kv_len"], "rule": "dense", "measured_ms": r["best_dense_ms"],
                      "predicted_ms": dense})  # fmt: skip
        for key, fraction, kind, per_q in CHECKS:
            w = benchmark_work(r, fraction, kind, per_q)
            table.append({"batch": r["batch"], "kv_len": r["kv_len"], "rule": key.removesuffix("_ms"),
                          "measured_ms": r[key], "predicted_ms": model.selection_ms(w)})  # fmt: skip
    for t in table:
        t["error"] = t["predicted_ms"] / t["measured_ms"] - 1
    crossings = []
    for b in sorted({r["batch"] for r in rows}):
        for key, fraction, kind, per_q in CHECKS:
            n = model.crossover(lambda n, b=b, f=fraction, k=kind, q=per_q: benchmark_work(
                {"batch": b, "kv_len": n}, f, k, q))  # fmt: skip
            crossings.append(f"- B={b} {key.removesuffix('_ms')}: selection predicted faster from {n} keys")
    columns = [("batch", "B", ""), ("kv_len", "keys", ""), ("rule", "rule", ""), ("measured_ms", "measured ms", ".4f"),
               ("predicted_ms", "predicted ms", ".4f"), ("error", "error", "+.1%")]  # fmt: skip
    errors = sorted(abs(t["error"]) for t in table)
    text = (
        f"# decode_cost_fit\n\nFitted on `{args.rows}` ({env.get('gpu')}, torch {env.get('torch')}, "
        f"triton {env.get('triton')}).\n\nCoefficients (ms = a + b x):\n\n```json\n"
        f"{json.dumps(model.to_json(), indent=2)}\n```\n\n{markdown_table(table, columns)}\n\n"
        f"Median absolute error {errors[len(errors) // 2]:.1%}, worst {errors[-1]:.1%}.\n\nCrossovers:\n\n"
        + "\n".join(crossings) + "\n"
    )  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_cost_fit.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
