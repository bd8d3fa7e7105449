"""GPU timing shared by the autotuner and the benchmarks: medians from ``triton.testing.do_bench``."""

from __future__ import annotations

# Below this many ms per call, the host's launch overhead could show in event timings: time CUDA
# graph replays instead (what a compiled model under CUDA graphs pays). Generous: a compiled index
# builder (dynamic shapes, ~30 launches) spends 1-3.5 ms on the host per call for 0.1-0.8 ms of GPU
# work on the H100; at 2 ms some of its lengths were timed on the host, some on the GPU.
GRAPH_BELOW_MS = 20.0


def median_ms(fn, rep_ms: int = 100, min_runs: int = 30) -> float:
    """Median time of ``fn`` in ms, over at least ``min_runs`` runs (``triton.testing.do_bench``
    alone repeats for ``rep_ms``: a handful of runs of a 20 ms kernel). Short calls are timed as CUDA
    graph replays (``do_bench_cudagraph``) when they can be captured, else like long ones."""
    import triton

    once = float(triton.testing.do_bench(fn, warmup=1, rep=1, return_mode="median"))
    rep = max(rep_ms, min_runs * once)
    if once < GRAPH_BELOW_MS:
        try:
            return float(triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median"))
        except Exception as e:  # not capturable (host sync, ...): plain timing
            print(f"median_ms: CUDA graph capture failed ({type(e).__name__}); timing without graphs", flush=True)
    return float(triton.testing.do_bench(fn, warmup=max(25, 3 * once), rep=rep, return_mode="median"))
