"""What ``sparsecomp.compile`` decides by default on this GPU (no autotune run, no options): a
Llama-3-8B-shaped model (2 layers, random weights, bf16) with a streaming plan (sink 128 + window
2048) at several lengths, compiled for each; per length the inspect report's choice,
predicted time and runner-up, and the measured forward time next to the best dense path of the
same run: eager (SDPA's fused causal kernels) and ``torch.compile`` (an N x N mask). Writes
``auto_decisions.md``.

    python benchmarks/auto_decisions.py --lengths 2048 4096 8192 32768 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import environment, markdown_table, median_ms, write_results  # noqa: E402

import sparsecomp  # noqa: E402
from sparsecomp.demo import build_model  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 32768])
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    model = build_model("llama3-8b", 2, torch.bfloat16, "cuda")
    rows = []
    for n in args.lengths:
        torch._dynamo.reset()
        compiled = sparsecomp.compile(model, "streaming:sink=128,window=2048", dynamic=False)
        dense = torch.compile(model, dynamic=False)
        ids = torch.randint(0, model.config.vocab_size, (1, n), device="cuda")
        with torch.no_grad():
            ours_ms = median_ms(lambda: compiled(ids))  # noqa: B023
            compile_ms = median_ms(lambda: dense(ids))  # noqa: B023
            eager_ms = median_ms(lambda: model(ids))  # noqa: B023
        dense_ms = min(compile_ms, eager_ms)
        site = sparsecomp.inspect(compiled).sites[0]
        d = site.decision
        rows.append({"N": n, "choice": d.option, "predicted_ms": d.predicted_ms, "runner_up": d.runner_up,
                     "runner_up_ms": d.runner_up_ms, "crossover": d.crossover, "source": d.source,
                     "forward_ms": ours_ms, "eager_ms": eager_ms, "compile_ms": compile_ms,
                     "speedup": dense_ms / ours_ms})  # fmt: skip
        print(rows[-1], flush=True)
        print(sparsecomp.inspect(compiled))
    columns = [
        ("N", "N", ""), ("choice", "choice (first site)", ""), ("predicted_ms", "predicted ms", ".3f"),
        ("runner_up", "runner-up", ""), ("runner_up_ms", "runner-up ms", ".3f"), ("crossover", "crossover N", ""),
        ("forward_ms", "forward ms", ".2f"), ("eager_ms", "eager SDPA ms", ".2f"),
        ("compile_ms", "torch.compile ms", ".2f"), ("speedup", "speedup vs best dense", ".2f"),
        ("source", "decided by", ""),
    ]  # fmt: skip
    write_results(Path(args.out), "auto_decisions", environment(), rows, markdown_table(rows, columns))


if __name__ == "__main__":
    main()
