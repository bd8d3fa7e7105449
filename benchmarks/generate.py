"""Per-token decode latency of a Llama-3-8B-shaped model (random bf16 weights) with a long static KV
cache: dense (eager Hugging Face, and torch.compile, with and without CUDA graphs) against
sparsecomp's decode rules, and the floor: the same model with attention made free (it returns its
queries; the cache is still written). "+stepgraphs" after a path's name replays each step as one
CUDA graph (sparsecomp's ``runtime/step_graphs.py``, also around the dense torch.compile model);
"+cudagraphs" is Inductor's reduce-overhead mode (it crashes while capturing on torch 2.11).

Each row runs the decode step ``generate`` runs (one token per sequence, ``cache_position`` = the
step's index, a static cache of fixed length, greedy next token from the logits, no host sync)
after a 16-token prompt, with the cache then filled with random keys and values up to the context
length (speed does not depend on the values; a 128K x B=8 prefill would not fit beside the cache).
The decode state sparsecomp keeps beside the cache (label cache, page min/max) is filled the same
way. Channels are random (accuracy is benchmarks/decode_accuracy.py's question). Medians over
``--steps`` steps; every ratio is against the best dense path of the same shape. Each row runs in a
process of its own (a crash loses that row only).

    python benchmarks/generate.py --context 131072 --batches 8 1 --out DIR
    python benchmarks/generate.py --batches 8 --layers 4 --row-timeout 280 --out DIR  # fits one device call
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import environment, free_attention, markdown_table, merge_runs, write_results  # noqa: E402

import sparsecomp  # noqa: E402
from sparsecomp.demo import SHAPES, build_model  # noqa: E402
from sparsecomp.plan import Plan, Rule  # noqa: E402
from sparsecomp.runtime.step_graphs import DecodeStepGraphs  # noqa: E402

PROMPT = 16
MEMORY_GIB = 110  # weights + KV cache; the rest is left for activations and compile


def layers_that_fit(shape: str, batch: int, context: int) -> int:
    hidden, layers, heads, kv_heads, inter = SHAPES[shape]
    head_dim = hidden // heads
    weights = 2 * (2 * hidden * hidden + 2 * hidden * kv_heads * head_dim + 3 * hidden * inter)
    cache = 2 * 2 * batch * context * kv_heads * head_dim
    return max(1, min(layers, int(MEMORY_GIB * 2**30 // (weights + cache))))


def random_channels(model, count: int = 16) -> dict:
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    g = torch.Generator().manual_seed(0)
    return {
        f"model.layers.{i}.self_attn": [
            torch.randperm(head_dim, generator=g)[:count].tolist() for _ in range(cfg.num_key_value_heads)
        ]
        for i in range(cfg.num_hidden_layers)
    }


def fill_randomly(cache, backend, context: int) -> None:
    """Keys and values of every layer, and sparsecomp's decode state, as after a prompt of
    ``context`` tokens."""
    for whole in cache.layers:
        whole.cumulative_length.fill_(context)
        for layer in getattr(whole, "sublayers", [whole]):  # a layer of head groups: each group's
            for t in (layer.keys, layer.values):
                if t.is_cuda:  # host copies (an offloading cache) keep zeros: speed does not depend on values
                    t.normal_()
            # a static layer writes the next token at its own count of written tokens and masks the
            # rest: without this the model sees only the short prompt (selections then read nothing)
            layer.cumulative_length.fill_(context)
            if hasattr(layer, "position"):  # an evicting layer: every slot held, keys spread over the context
                spread = torch.linspace(0, context - 1, layer.slots, device=layer.position.device)
                layer.position.copy_(spread.long().expand_as(layer.position))
                layer.rank.normal_()
    states = [] if backend is None else backend.states.tensors.values()
    for state in states:
        for t in state:
            t.fill_(True) if t.dtype == torch.bool else t.normal_()


def progress(line: str) -> None:
    """A child's progress on stderr: where a slow row spends its time shows in the log."""
    print(line, file=sys.stderr, flush=True)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def step_times(forward, model, batch: int, context: int, steps: int, backend_of=None, cache=None) -> list[float]:
    """Seconds per decode step at cache positions context .. context + steps - 1; ``cache``: a static
    cache of length ``context + steps + 1`` (default: transformers' StaticCache on the GPU)."""
    from transformers import StaticCache

    dev = next(model.parameters()).device
    cache = StaticCache(config=model.config, max_cache_len=context + steps + 1) if cache is None else cache
    mask = torch.ones(batch, context + steps + 1, dtype=torch.long, device=dev)
    ids = torch.randint(0, model.config.vocab_size, (batch, PROMPT), device=dev)
    start = time.perf_counter()
    with torch.no_grad():
        out = forward(
            input_ids=ids, attention_mask=mask, past_key_values=cache,
            cache_position=torch.arange(PROMPT, device=dev), logits_to_keep=1,
        )  # fmt: skip
        progress(f"prompt (compile included) {time.perf_counter() - start:.1f} s")
        fill_randomly(cache, backend_of() if backend_of else None, context)
        token = out.logits[:, -1:].argmax(-1)
        times = []
        for t in range(steps):
            sync(dev)
            t0 = time.perf_counter()
            out = forward(
                input_ids=token, attention_mask=mask, past_key_values=cache,
                cache_position=torch.tensor([context + t], device=dev), logits_to_keep=1,
            )  # fmt: skip
            token = out.logits[:, -1:].argmax(-1)
            sync(dev)
            times.append(time.perf_counter() - t0)
            progress(f"step {t}: {times[-1] * 1e3:.1f} ms")
    return times


def path_parts(path: str) -> tuple[str, str | None, str, bool]:
    """A row's path as (name, Inductor mode, rule, step graphs): "sparsecomp+cudagraphs RULE" ->
    ("sparsecomp", "reduce-overhead", RULE, False); "+stepgraphs": sparsecomp's whole-step CUDA
    graphs (``runtime/step_graphs.py``) around the compiled forward instead."""
    head, _, rule = path.partition(" ")
    name, _, graphs = head.partition("+")
    return name, "reduce-overhead" if graphs == "cudagraphs" else None, rule, graphs == "stepgraphs"


def runner(path: str, model):
    """(forward, backend getter) for one row's path: "eager", "torch.compile", "floor" or
    "sparsecomp RULE", each compiled one with "+cudagraphs" after the name for Inductor's
    reduce-overhead mode (CUDA graphs, the mode HF recommends for a static cache), or
    "+stepgraphs" for whole-step graphs."""
    name, mode, rule, step_graphs = path_parts(path)
    if name == "eager":
        return model, None
    if name in ("torch.compile", "floor"):
        compiled = torch.compile(model, mode=mode, fullgraph=True)
        return (DecodeStepGraphs(compiled) if step_graphs else compiled), None
    plan = Plan(decode_default=Rule.parse(rule), channels=random_channels(model))
    compiled = sparsecomp.compile(model, plan, dynamic=False, mode=mode, cuda_graphs=step_graphs)
    return compiled, lambda: compiled._sparsecomp_backend


def measure(path: str, model, batch: int, context: int, steps: int) -> dict:
    torch._dynamo.reset()
    model.config._attn_implementation = "free" if path_parts(path)[0] == "floor" else "sdpa"
    forward, backend_of = runner(path, model)
    row = {"path": path, "batch": batch, "context": context, "layers": model.config.num_hidden_layers}
    t0 = time.perf_counter()
    times = step_times(forward, model, batch, context, steps, backend_of)
    row["first_steps_s"] = time.perf_counter() - t0
    row["ms_per_token"] = statistics.median(times[steps // 4 :]) * 1e3  # after warm-up and CUDA-graph capture
    row["tokens_per_s"] = batch / row["ms_per_token"] * 1e3
    if backend_of is not None:
        sites = sparsecomp.inspect(forward).sites
        row["became"] = ", ".join(sorted({s.became for s in sites}))
    print(row, flush=True)
    return row


COLUMNS = [
    ("batch", "B", ""),
    ("context", "context", ""),
    ("layers", "layers", ""),
    ("path", "path", ""),
    ("ms_per_token", "ms / step", ".3f"),
    ("tokens_per_s", "tokens/s", ".0f"),
    ("vs_best_dense", "x best dense", ".2f"),
    ("vs_floor", "x floor time", ".2f"),
    ("became", "sites became", ""),
    ("note", "note", ""),
]


def one_row(args) -> None:
    """The child process: one path at one shape, its row as JSON on the last line of stdout."""
    from transformers import AttentionInterface

    AttentionInterface.register("free", free_attention)
    layers = args.layers or layers_that_fit(args.shape, args.batch, args.context)
    t0 = time.perf_counter()
    model = build_model(args.shape, layers, torch.bfloat16, args.device)
    progress(f"{args.path} B={args.batch} N={args.context}: {layers} layers built in {time.perf_counter() - t0:.1f} s")
    row = measure(args.path, model, args.batch, args.context, args.steps)
    print(json.dumps(row), flush=True)


def run_row(args, path: str, batch: int, context: int) -> dict | None:
    """Each row in a process of its own: a crash (a compile that segfaults, out of memory) loses
    that row only, and every path starts from a fresh allocator."""
    cmd = [sys.executable, __file__, "--one", "--path", path, "--batch", str(batch), "--context", str(context),
           "--shape", args.shape, "--steps", str(args.steps), "--device", args.device]  # fmt: skip
    cmd += ["--layers", str(args.layers)] if args.layers else []
    try:  # the child's stderr (its progress lines) passes through to ours
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=args.row_timeout)
    except subprocess.TimeoutExpired:
        print(f"{path} B={batch} N={context}: over {args.row_timeout} s", flush=True)
        return {"path": path, "batch": batch, "context": context, "note": f"over {args.row_timeout} s"}
    last = done.stdout.strip().splitlines()[-1:] if done.stdout.strip() else []
    if done.returncode != 0 or not last or not last[0].startswith("{"):
        print(f"{path} B={batch} N={context}: exit {done.returncode}", flush=True)
        return {"path": path, "batch": batch, "context": context, "note": f"failed: exit {done.returncode}"}
    return json.loads(last[0])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--context", type=int, nargs="+", default=[131072])
    p.add_argument("--batches", type=int, nargs="+", default=[8, 1])
    p.add_argument("--steps", type=int, default=24)
    p.add_argument(
        "--paths", nargs="+",
        default=["eager", "torch.compile", "torch.compile+stepgraphs", "floor", "floor+stepgraphs",
                 "sparsecomp double_sparsity:channels=16,ratio=0.0625",
                 "sparsecomp+stepgraphs double_sparsity:channels=16,ratio=0.0625"],
    )  # fmt: skip
    p.add_argument("--layers", type=int, help="fewer layers than fit (per-step time scales with layers)")
    p.add_argument("--row-timeout", type=float, default=None, help="seconds one row may take")
    p.add_argument("--device", default="cuda", help="cpu: a quick check of the script on a tiny shape")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--merge", nargs="+", help="join results .json files of one GPU; measure nothing")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # the child process
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        args.context = args.context[0]
        return one_row(args)
    if args.merge:
        env, rows = merge_runs([json.loads(Path(f).read_text()) for f in args.merge],
                               key=lambda r: (r["batch"], r["context"], r["path"]))  # fmt: skip
        rows.sort(key=lambda r: (r["batch"], r["context"]))  # stable: each shape's rows in run order
        for shape in sorted({(r["batch"], r["context"]) for r in rows}, reverse=True):
            add_ratios([r for r in rows if (r["batch"], r["context"]) == shape])
        return write_results(Path(args.out), "generate", env, rows, markdown_table(rows, COLUMNS))
    rows = []
    for context in args.context:
        for batch in args.batches:
            shape_rows = []
            for path in args.paths:  # results are written after every row: a later crash loses nothing
                shape_rows.append(run_row(args, path, batch, context))
                add_ratios(shape_rows)
                write_results(Path(args.out), "generate", environment(), rows + shape_rows,
                              markdown_table(rows + shape_rows, COLUMNS))  # fmt: skip
            rows += shape_rows


def add_ratios(shape_rows: list[dict]) -> None:
    """Each timed row against the best dense row and the floor of its shape."""
    timed = [r for r in shape_rows if "ms_per_token" in r]
    dense = [r["ms_per_token"] for r in timed if path_parts(r["path"])[0] in ("eager", "torch.compile")]
    floor = [r["ms_per_token"] for r in timed if path_parts(r["path"])[0] == "floor"]
    for r in timed:
        if dense:
            r["vs_best_dense"] = min(dense) / r["ms_per_token"]
        if floor:
            r["vs_floor"] = r["ms_per_token"] / min(floor)


if __name__ == "__main__":
    main()
