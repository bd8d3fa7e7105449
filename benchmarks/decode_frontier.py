"""Decode accuracy against the GPU memory each rule's cache keeps: a memory-for-accuracy frontier,
drawn from the decode accuracy results (``decode_accuracy.json`` and ``decode_accuracy_duo.json``:
SmolLM2, 2K documents, the last 32 tokens decoded), measuring nothing itself.

The GPU share of a row is the bytes of K and V its cache keeps on the GPU over a dense cache's, at
the rows' 2048 keys: sparsecomp's eviction caches keep exactly the keys the rule reads
(``StreamingKVCache``, ``EvictingKVCache``, ``PlanKVCache``: their byte counts are tested against
their tensors), plus 12 bytes of eviction state per kept key and KV head, left out here;
Double Sparsity keeps the whole cache in host memory and its label cache (``channels`` of
``head_dim`` channels of K) on the GPU (``HostKVCache``, the same tokens as on the GPU); Quest keeps
the whole cache and its page bounds (no eviction mode). Rows keeping some layers dense keep those
layers whole on the GPU.

    python benchmarks/decode_frontier.py --out docs/decode_frontier.png
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
FILES = ("decode_accuracy.json", "decode_accuracy_duo.json")
LAYERS, HEAD_DIM, CHANNELS, PAGE = 30, 64, 16, 16  # SmolLM2-135M; the rows' label channels and Quest page


def gpu_share(rule: str, length: int) -> float:
    """The GPU bytes of K and V (and labels, page bounds) a cache keeping what ``rule`` reads holds,
    over a dense cache's."""
    fraction = re.search(r"1/(\d+)", rule)
    if rule == "dense":
        share = 1.0
    elif rule.startswith("double_sparsity"):
        share = CHANNELS / HEAD_DIM / 2  # labels: CHANNELS of K's HEAD_DIM channels, half the K/V bytes
    elif rule.startswith("quest"):
        share = 1.0 + 2 / PAGE / 2  # the whole cache, and a min and a max of K per page
    elif rule.startswith("streaming"):
        sink, window = map(int, re.search(r"sink (\d+) \+ window (\d+)", rule).groups())
        share = (sink + window) / length
    elif rule.startswith(("snapkv", "h2o")):
        share = 1 / int(fraction.group(1))
    elif rule.startswith("duo"):
        sink, window = map(int, re.search(r"sink (\d+) \+ window (\d+)", rule).groups())
        share = 0.5 + 0.5 * (sink + window) / length  # half the KV heads stream
    else:
        raise ValueError(f"no GPU share known for the row {rule!r}")
    if "layers 0-1 dense" in rule:
        share = (2 + (LAYERS - 2) * share) / LAYERS
    return share


def family(rule: str) -> str:
    return rule.split(":")[0].split(" ")[0]


def load_rows() -> list[dict]:
    rows = []
    for name in FILES:
        for row in json.loads((RESULTS / name).read_text())["rows"]:
            if row["rule"] != "dense" and row.get("kl_vs_dense") is not None:
                rows.append({**row, "gpu_share": gpu_share(row["rule"], row["length"])})
    return rows


def plot(rows: list[dict], path: Path) -> None:
    from sparsecomp.plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for kind in dict.fromkeys(family(r["rule"]) for r in rows):
        part = [r for r in rows if family(r["rule"]) == kind]
        ax.scatter([r["gpu_share"] for r in part], [r["kl_vs_dense"] for r in part], label=kind, s=28)
        for r in part:
            label = r["rule"].split(" (")[0].replace("duo: half the KV heads streaming, ", "duo, ")
            point = (r["gpu_share"], r["kl_vs_dense"])
            ax.annotate(label, point, fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("GPU memory for the KV cache, share of dense")
    ax.set_ylabel("KL(dense || rule) per decoded token")
    ax.set_title("SmolLM2-135M, 2K documents, last 32 tokens decoded (lower left is better)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/decode_frontier.png")
    args = p.parse_args(argv)
    rows = load_rows()
    for r in sorted(rows, key=lambda r: r["gpu_share"]):
        print(f"{r['gpu_share']:7.4f}  KL {r['kl_vs_dense']:.4f}  pass keys {r['passkey_accuracy']:.2f}  {r['rule']}")
    plot(rows, Path(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
