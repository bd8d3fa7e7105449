"""The ``sparsecomp`` command line."""

from __future__ import annotations

import argparse
import json


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sparsecomp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="compile a Llama-architecture model with a streaming plan")
    demo.add_argument("--shape", default="tiny", choices=["tiny", "llama3-8b"])
    demo.add_argument("--layers", type=int, default=None, help="number of layers (default: the shape's)")
    demo.add_argument("--seq-len", type=int, nargs="+", default=[512])
    demo.add_argument("--sink", type=int, default=16)
    demo.add_argument("--window", type=int, default=64)
    demo.add_argument("--block", type=int, default=None, help="block size of the sparse index")
    demo.add_argument("--device", default=None)
    demo.add_argument("--no-check", action="store_true", help="skip the dense masked reference")
    demo.add_argument("--json", default=None, help="write the results to this file")
    cal = sub.add_parser("calibrate", help="measure a pretrained model's attention and write a per-head plan")
    cal.add_argument("--model", default="smollm2", help="'smollm2' or a local Hugging Face model folder")
    cal.add_argument("--out", default="plan.json")
    cal.add_argument("--target", type=float, default=0.9, help="attention mass (CRA) each head must keep")
    cal.add_argument(
        "--max-error", type=_float_or_none, default=0.1, help="bound on each head's attention output error ('none')"
    )
    cal.add_argument("--influence", action="store_true", help="select on MoA's attention x gradient influence")
    cal.add_argument(
        "--budget", type=float, default=None, help="mean attention density to allocate across heads (replaces --target)"
    )
    cal.add_argument("--rules", nargs="+", default=None, help="candidate kinds (default: all)")
    cal.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    cal.add_argument("--block", type=int, default=128)
    cal.add_argument("--device", default=None)
    cal.add_argument("--seed", type=int, default=0)
    tune = sub.add_parser("autotune", help="fit this GPU's cost model and time each site's options (CUDA)")
    tune.add_argument("--model", default="smollm2", help="'smollm2', a .gguf file or a local Hugging Face folder")
    tune.add_argument("--plan", default=None, help="a plan .json or preset (default: dense)")
    tune.add_argument("--lengths", type=int, nargs="+", default=[4096], help="example input lengths")
    tune.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    tune.add_argument("--refit", action="store_true", help="fit the cost model again even if one is stored")
    tune.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    if args.command == "calibrate":
        return _calibrate(args)
    if args.command == "autotune":
        return _autotune(args)

    from .demo import run_demo

    results = [
        run_demo(
            shape=args.shape,
            layers=args.layers,
            seq_len=n,
            sink=args.sink,
            window=args.window,
            device=args.device,
            check=not args.no_check,
            block=args.block,
        )
        for n in args.seq_len
    ]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


def _float_or_none(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def _calibrate(args) -> int:
    import torch

    from .calibrate import CANDIDATE_KINDS, calibrate
    from .pretrained import load_pretrained

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_pretrained(args.model, device=device)
    plan = calibrate(
        model, tokenizer=tokenizer, target=args.target, max_error=args.max_error, influence=args.influence,
        budget=args.budget, rules=tuple(args.rules or CANDIDATE_KINDS), lengths=tuple(args.lengths), block=args.block,
        seed=args.seed,
    )  # fmt: skip
    plan.save(args.out)
    kinds = [r.kind for rules in plan.sites.values() for r in rules]
    summary = ", ".join(f"{k} {kinds.count(k)}" for k in sorted(set(kinds)))
    print(f"wrote {args.out}: {len(plan.sites)} sites, heads: {summary}")
    return 0


def _autotune(args) -> int:
    import torch

    from .autotune import autotune
    from .calibration_data import default_calibration_ids
    from .pretrained import load_pretrained

    model, tokenizer = load_pretrained(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    for n in args.lengths:  # one shape bucket per length: the first calibration document cut to n tokens
        ids = torch.tensor([default_calibration_ids(tokenizer, [n], passkeys=0)[0]], device=args.device)
        print(autotune(model, (ids,), args.plan, refit=args.refit))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
