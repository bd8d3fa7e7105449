"""Where a forward's GPU time goes: the CUDA kernels of one warm forward of the ``ttft.py`` model,
by total time, for each path asked (a plan, or ``floor`` / ``torch.compile`` / ``eager``). A diagnostic
beside ``ttft.py``: it explains a row's time against the floor's, it is not a result.

    python benchmarks/profile_forward.py --length 131072 --paths floor streaming:sink=128,window=2048
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import free_attention  # noqa: E402
from ttft import _runner  # noqa: E402

from sparsecomp.demo import build_model  # noqa: E402


def kernel_table(run, ids, top: int) -> str:
    """The ``top`` kernels of one forward by CUDA time, after two warm-up forwards."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        for _ in range(2):
            run(ids, use_cache=False, logits_to_keep=1)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run(ids, use_cache=False, logits_to_keep=1)
            torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=70)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--length", type=int, default=131072)
    p.add_argument("--paths", nargs="+", default=["floor", "streaming:sink=128,window=2048"])
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args(argv)
    from transformers import AttentionInterface

    AttentionInterface.register("free", free_attention)
    model = build_model("llama3-8b", args.layers, torch.bfloat16, "cuda")
    ids = torch.randint(0, model.config.vocab_size, (1, args.length), device="cuda")
    for name in args.paths:
        torch._dynamo.reset()
        print(f"## {name}, N={args.length}\n{kernel_table(_runner(name, model), ids, args.top)}", flush=True)


if __name__ == "__main__":
    main()
