"""Shared benchmark harness: timing, environment description, result files."""

from __future__ import annotations

import csv
import json
import platform
from pathlib import Path

import torch
import triton

# Below this many ms per call, the host's launch overhead could show in event timings: time CUDA
# graph replays instead (what a compiled model under CUDA graphs pays).
GRAPH_BELOW_MS = 2.0


def median_ms(fn, rep_ms: int = 100, min_runs: int = 30) -> float:
    """Median time of ``fn`` in ms, over at least ``min_runs`` runs (``triton.testing.do_bench``
    alone repeats for ``rep_ms``: a handful of runs of a 20 ms kernel). Short calls are timed as CUDA
    graph replays (``do_bench_cudagraph``) when they can be captured, else like long ones."""
    once = float(triton.testing.do_bench(fn, warmup=1, rep=1, return_mode="median"))
    rep = max(rep_ms, min_runs * once)
    if once < GRAPH_BELOW_MS:
        try:
            return float(triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median"))
        except Exception as e:  # not capturable (host sync, ...): plain timing
            print(f"median_ms: CUDA graph capture failed ({type(e).__name__}); timing without graphs", flush=True)
    return float(triton.testing.do_bench(fn, warmup=max(25, 3 * once), rep=rep, return_mode="median"))


def environment() -> dict:
    import transformers  # noqa: F401  (optional: only its version is recorded)

    env = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(
            gpu=props.name,
            sm_count=props.multi_processor_count,
            capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    try:
        import transformers as tf

        env["transformers"] = tf.__version__
    except ImportError:
        pass
    return env


def write_results(out_dir: Path, stem: str, env: dict, rows: list[dict], table: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
    if rows:
        keys = sorted({k for r in rows for k in r})
        with open(out_dir / f"{stem}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
    header = "\n".join(f"- {k}: {v}" for k, v in env.items())
    (out_dir / f"{stem}.md").write_text(f"# {stem}\n\n{header}\n\n{table}\n")


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, title, format)."""
    lines = ["| " + " | ".join(t for _, t, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key)
            cells.append("-" if v is None else (format(v, fmt) if fmt else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
