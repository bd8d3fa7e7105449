"""Shared benchmark harness: timing, environment description, result files."""

from __future__ import annotations

import csv
import json
import platform
from pathlib import Path

import torch
import triton

from sparsecomp.tuning.timing import GRAPH_BELOW_MS, median_ms  # noqa: F401  (the benchmarks import them from here)


def compiled_flex():
    """FlexAttention compiled with static shapes, recompiling once per length and mask (a mask
    function that reads a pattern's tensors is a new function per pattern); hitting the limit is an
    error, never a silent fall back to eager Flex (N x N scores)."""
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.config.recompile_limit = 256
    torch._dynamo.config.accumulated_recompile_limit = 4096
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    return torch.compile(flex_attention, dynamic=False)


def free_attention(module, query, key, value, attention_mask, **kwargs):
    """The floor: attention that costs nothing ((B, Hq, N, D) queries back as (B, N, Hq, D)), for
    transformers' AttentionInterface (``register("free", free_attention)``). One element of K and V
    joins the output so that the compiler keeps their projections: every attention method needs K
    and V, and with queries alone Inductor drops those matmuls (3.7% of a 128K forward)."""
    return (query + key[:, :1, :1, :1] + value[:, :1, :1, :1]).transpose(1, 2), None


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


def merge_runs(results: list[dict], key) -> tuple[dict, list[dict]]:
    """One environment and the rows of several saved runs (a grid split over device calls), a later
    run's row replacing an earlier one with the same ``key(row)``; runs from different GPUs or
    versions are refused (their ratios would not compare)."""
    env = results[0]["environment"]
    for other in results[1:]:
        if other["environment"] != env:
            raise ValueError(f"runs differ in environment: {env} vs {other['environment']}")
    latest = {key(r): dict(r) for res in results for r in res["rows"]}
    return env, list(latest.values())


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
