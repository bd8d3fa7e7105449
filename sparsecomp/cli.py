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
    args = parser.parse_args(argv)

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


if __name__ == "__main__":
    raise SystemExit(main())
