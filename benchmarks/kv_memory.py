"""KV-cache memory and offloaded decoding of a Llama-3-8B-shaped model (random bf16 weights).

Each row decodes from a static cache of ``context`` keys (a 16-token prompt, then the cache filled
with random keys and values, as in benchmarks/generate.py) and reports the GPU bytes of the K/V and
of sparsecomp's decode state (counted from the tensors by ``report.memory``, and checked against the
allocator's growth), the host bytes, and the median time per decode step. Paths:

- ``gpu eager`` and ``gpu torch.compile``: dense, cache on the GPU (the baselines for time and memory).
- ``gpu RULE``: sparsecomp with a decode rule, cache on the GPU.
- ``host RULE``: sparsecomp with the cache in host memory (``sparsecomp.HostKVCache``), read in
  place by the GPU: Double Sparsity-Offload with a double_sparsity rule; with ``dense``, every
  step reads the whole cache across the bus.
- ``ring RULE``: eviction, sparsecomp with a streaming rule on a ``sparsecomp.StreamingKVCache``
  (each layer keeps only the rule's sink and window keys, in a ring); ``gpu RULE`` of the same
  rule keeps the whole cache and reads the same keys.
- ``evict RULE``: eviction by importance, sparsecomp with a snapkv or h2o rule on a
  ``sparsecomp.EvictingKVCache`` (each layer keeps the rule's budget of keys per KV head, dense
  attention over them); ``gpu RULE`` of the same rule keeps the whole cache and selects from it.
- ``duo RULE``: eviction per head within every layer (DuoAttention), half of each layer's KV heads
  decode with the streaming RULE and keep only its keys, the others dense over the whole past
  (``sparsecomp.PlanKVCache``: one layer of two head groups); ``duofull RULE``: the same plan
  over a full static cache.
- ``halfring RULE``: eviction for half the model, a plan with half its heads streaming (by layer:
  the even layers decode with the streaming RULE and keep only its keys, in a ring; the odd ones
  decode dense over a full static cache; ``StreamingKVCache(layers=...)``, under which the model runs
  transformers' SDPA with the shared mask cut per layer, ``"sparsecomp_sdpa"``).
- ``WHERE+stepgraphs RULE`` (any compiled path): each decode step replayed as one CUDA graph
  (``sparsecomp.compile(..., cuda_graphs=True)``; around torch.compile for the dense row).
- ``hf-offload eager``: transformers' own offloading static cache (``StaticCache(offloading=True)``:
  each layer's whole K/V copied to the GPU at each step, the next layer's prefetched), FlexGen's
  scheme: the baseline for decoding with the KV on the host.

Channels are random (accuracy is benchmarks/decode_accuracy.py's question; the offloaded cache
gives the tokens of the on-GPU one, tests/test_host_cache.py). Per-step time and KV bytes grow
linearly with the layers; the largest batch at each context is computed for all 32 layers from the
measured bytes per layer and sequence; ``--batch B`` decodes B sequences in every row (tokens/s at a
batch that fits). Each row runs in a process of its own.

    python benchmarks/kv_memory.py --layers 8 --out DIR
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import random_channels, step_times  # noqa: E402
from harness import environment, markdown_table, merge_runs, write_results  # noqa: E402

import sparsecomp  # noqa: E402
from sparsecomp.demo import SHAPES, build_model  # noqa: E402
from sparsecomp.plan import Plan, Rule  # noqa: E402
from sparsecomp.runtime.kv_memory import kv_memory  # noqa: E402
from sparsecomp.runtime.step_graphs import DecodeStepGraphs  # noqa: E402

GIB = 2**30
DS = "double_sparsity:channels=16,ratio=0.0625"
STREAMING = "streaming:sink=64,window=1024"
H2O = "h2o:ratio=0.0625,window=64"
PATHS = ["gpu eager", "gpu torch.compile", f"gpu {DS}", f"host {DS}", "host dense", "hf-offload eager",
         f"gpu {STREAMING}", f"ring {STREAMING}", f"halfring {STREAMING}", f"duo {STREAMING}",
         f"duofull {STREAMING}", f"gpu {H2O}", f"evict {H2O}"]  # fmt: skip


def path_parts(path: str) -> tuple[str, str, bool]:
    """(where, rule, step graphs): "ring+stepgraphs RULE" -> ("ring", RULE, True), its compiled
    forward replaying each step as one CUDA graph (``cuda_graphs=True``)."""
    head, _, rule = path.partition(" ")
    where, _, graphs = head.partition("+")
    return where, rule, graphs == "stepgraphs"


def make_cache(path: str, model, length: int, batch: int):
    from transformers import StaticCache

    where, rule, _ = path_parts(path)
    allocate = dict(batch_size=batch, dtype=torch.bfloat16, device="cuda")
    if where == "host":
        return sparsecomp.HostKVCache(config=model.config, max_cache_len=length, **allocate)
    if where in ("ring", "halfring"):  # eviction: only the streaming rule's keys are kept
        kept = Rule.parse(rule)
        return sparsecomp.StreamingKVCache(
            config=model.config, max_cache_len=length, sink=kept.sink, window=kept.window,
            layers=streaming_layers(model) if where == "halfring" else None, **allocate,
        )  # fmt: skip
    if where == "duo":  # eviction per head: the streaming heads keep only the rule's keys
        return sparsecomp.PlanKVCache(model, length, duo_plan(model, rule), **allocate)
    if where == "evict":  # eviction: only the snapkv / h2o rule's keys are kept
        return sparsecomp.EvictingKVCache(config=model.config, max_cache_len=length, rule=rule, **allocate)
    return StaticCache(config=model.config, max_cache_len=length, offloading=where == "hf-offload")


def streaming_layers(model) -> list[int]:
    """The layers a ``halfring`` path decodes with its streaming rule (the even ones)."""
    return list(range(0, model.config.num_hidden_layers, 2))


def duo_plan(model, rule: str) -> Plan:
    """Every layer's first half of KV heads decoding dense (retrieval heads), the others with the
    streaming ``rule`` (DuoAttention's split, fixed here: calibration chooses it for real models)."""
    kv_heads = model.config.num_key_value_heads
    heads = [Rule()] * (kv_heads // 2) + [Rule.parse(rule)] * (kv_heads - kv_heads // 2)
    return Plan(decode_sites={f"model.layers.{i}.self_attn": heads for i in range(model.config.num_hidden_layers)})


def runner(path: str, model):
    where, rule, graphs = path_parts(path)
    if rule == "eager":
        return model, None
    if rule == "torch.compile":
        compiled = torch.compile(model, fullgraph=True)
        return (DecodeStepGraphs(compiled) if graphs else compiled), None
    if where in ("duo", "duofull"):
        plan = duo_plan(model, rule)
    elif where == "halfring":
        sites = {f"model.layers.{i}.self_attn": Rule.parse(rule) for i in streaming_layers(model)}
        plan = Plan(decode_default=Rule(), decode_sites=sites)
    else:
        plan = Plan(decode_default=Rule.parse(rule), channels=random_channels(model))
    compiled = sparsecomp.compile(model, plan, dynamic=False, cuda_graphs=graphs)
    return compiled, compiled


def measure(path: str, model, context: int, steps: int, warmup: int, batch: int) -> dict:
    where = path_parts(path)[0]
    forward, compiled = runner(path, model)
    cache = make_cache(path, model, context + warmup + steps + 1, batch)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    backend_of = None if compiled is None else (lambda: compiled._sparsecomp_backend)
    attached = cache.attached(model) if hasattr(cache, "attached") else contextlib.nullcontext()  # as generate
    with attached:
        times = step_times(forward, model, batch, context, warmup + steps, backend_of, cache)
    step = statistics.median(times[warmup:])
    report = sparsecomp.inspect(compiled) if compiled is not None else None
    memory = report.memory(cache) if report is not None else kv_memory(cache)
    layer_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    all_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    row = {
        "path": path, "context": context, "batch": batch, "layers": model.config.num_hidden_layers,
        "ms_per_token": step * 1e3, "tokens_per_s": batch / step,
        "step_ms": [round(t * 1e3, 2) for t in times],
        "kv_gpu_gib": memory.total("kv_gpu") / GIB, "state_gpu_gib": memory.total("state_gpu") / GIB,
        "gpu_gib": memory.total("gpu") / GIB, "host_gib": memory.total("kv_host") / GIB,
        "dense_gib": memory.total("dense") / GIB,
        # what the allocator holds beyond the model after the steps (the cache, its state, the
        # step's last activations): a check on the count above
        "allocated_gib": (torch.cuda.memory_allocated() - before) / GIB,
        "layer_weights_gib": layer_bytes / GIB,
        "other_weights_gib": (all_bytes - model.config.num_hidden_layers * layer_bytes) / GIB,
        "device_gib": torch.cuda.get_device_properties(0).total_memory / GIB,
    }  # fmt: skip
    if where == "hf-offload":  # its host copies are ordinary CPU tensors, its GPU buffers two layers
        row["host_gib"], row["kv_gpu_gib"] = row["dense_gib"], row["allocated_gib"]
        row["gpu_gib"] = row["kv_gpu_gib"]
    if report is not None:
        row["became"] = ", ".join(sorted({s.became for s in report.sites if s.phase == "decode"}))
    return row


def largest_batch(row: dict, shape: str, gpu_gib: float, host_gib: float) -> dict:
    """The largest batch of ``row``'s context for all layers of ``shape``: GPU bytes per sequence
    against what the weights leave (10% kept for activations), host bytes against ``host_gib``."""
    layers = SHAPES[shape][1]
    scale = layers / row["layers"]
    weights = row["other_weights_gib"] + layers * row["layer_weights_gib"]
    per_gpu, per_host = (row[k] * scale / row.get("batch", 1) for k in ("gpu_gib", "host_gib"))
    by_gpu = int((0.9 * gpu_gib - weights) // per_gpu) if per_gpu > 0 else None
    by_host = int(host_gib // per_host) if per_host > 0 else None
    fits = [b for b in (by_gpu, by_host) if b is not None]
    return {"batch_by_gpu": by_gpu, "batch_by_host": by_host, "largest_batch": min(fits) if fits else None}


COLUMNS = [
    ("context", "context", ""),
    ("batch", "B", ""),
    ("layers", "layers", ""),
    ("path", "path", ""),
    ("ms_per_token", "ms / step", ".2f"),
    ("tokens_per_s", "tokens / s", ".1f"),
    ("vs_full_copy", "x hf-offload", ".2f"),
    ("gpu_gib", "GPU GiB (KV + state)", ".3f"),
    ("state_gpu_gib", "of it state", ".3f"),
    ("host_gib", "host GiB", ".2f"),
    ("vs_dense_memory", "GPU share of dense", ".3f"),
    ("allocated_gib", "allocator growth GiB", ".3f"),
    ("batch_by_gpu", "B by GPU, 32 layers", ""),
    ("batch_by_host", "B by host", ""),
    ("became", "decode sites became", ""),
    ("note", "note", ""),
]


def one_row(args) -> None:
    model = build_model(args.shape, args.layers, torch.bfloat16, "cuda")
    row = measure(args.path, model, args.context, args.steps, args.warmup, args.batch)
    print(json.dumps(row), flush=True)


def run_row(args, path: str, context: int) -> dict:
    cmd = [sys.executable, __file__, "--one", "--path", path, "--context", str(context), "--shape", args.shape,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
           "--layers", str(args.layers)]  # fmt: skip
    try:
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=args.row_timeout)
    except subprocess.TimeoutExpired:
        return {"path": path, "context": context, "note": f"over {args.row_timeout} s"}
    last = done.stdout.strip().splitlines()[-1:] if done.stdout.strip() else []
    if done.returncode != 0 or not last or not last[0].startswith("{"):
        return {"path": path, "context": context, "note": f"failed: exit {done.returncode}"}
    return json.loads(last[0])


def row_key(row: dict) -> tuple:
    return row["context"], row.get("batch"), row["path"]


def add_ratios(rows: list[dict], args) -> None:
    for r in rows:
        same = [
            o for o in rows if o["context"] == r["context"] and o.get("batch") == r.get("batch") and "ms_per_token" in o
        ]
        full_copy = [o["ms_per_token"] for o in same if o["path"].startswith("hf-offload")]
        if "ms_per_token" not in r:
            continue
        if full_copy:
            r["vs_full_copy"] = full_copy[0] / r["ms_per_token"]
        if r["dense_gib"]:
            r["vs_dense_memory"] = r["gpu_gib"] / r["dense_gib"]
        r.update(largest_batch(r, args.shape, r["device_gib"], args.host_gib))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--contexts", type=int, nargs="+", default=[131072, 262144])
    p.add_argument("--paths", nargs="+", default=PATHS)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch", type=int, default=1, help="sequences per step (all rows)")
    p.add_argument("--steps", type=int, default=8, help="timed decode steps (the median is reported)")
    p.add_argument(
        "--warmup",
        type=int,
        default=12,
        help="untimed steps first: transformers' offloading cache took ~10 steps to settle",
    )
    p.add_argument("--host-gib", type=float, default=100.0, help="host memory a cache may lock")
    p.add_argument("--row-timeout", type=float, default=200)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--merge", nargs="+", help="join results .json files of one GPU; measure nothing")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--context", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        return one_row(args)
    if args.merge:
        env, rows = merge_runs([json.loads(Path(f).read_text()) for f in args.merge], key=row_key)
        add_ratios(rows, args)
        return write_results(Path(args.out), "kv_memory", env, rows, markdown_table(rows, COLUMNS))
    env = {**environment(), "model": f"Llama-3-8B shape, {args.layers} layers, random bf16 weights, B={args.batch}"}
    rows = []
    for context in args.contexts:
        for path in args.paths:
            t0 = time.perf_counter()
            rows.append(run_row(args, path, context))
            print(f"{path} N={context}: {time.perf_counter() - t0:.0f} s {rows[-1]}", flush=True)
            add_ratios(rows, args)
            write_results(Path(args.out), "kv_memory", env, rows, markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
